#!/usr/bin/env bash
# Install atlasd as a systemd service on this machine (run as root from a checkout):
#   sudo deploy/install.sh            # CPU torch (the pinned wheel)
#   sudo ATLASD_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 deploy/install.sh   # GPU (deploy/GPU.md)
#   sudo deploy/install.sh --uninstall [--purge]
#   sudo deploy/install.sh --check-gpu   # after installing: CUDA + torch.compile under the unit's sandbox
# Creates the `atlasd` user, /opt/atlasd/venv (every package pinned by deploy/constraints.txt), /etc/atlasd
# (atlasd.env 0600, policies, mlflow.env 0600 + mlflow-auth.ini for the MLflow UI), /var/lib/atlasd,
# installs the units, runs `atlasd db migrate`, and enables (does not start) the service.
set -euo pipefail

PREFIX=/opt/atlasd
ETC=/etc/atlasd
STATE=/var/lib/atlasd
UNIT_DIR=/etc/systemd/system
SRC="$(cd "$(dirname "$0")/.." && pwd)"
CONSTRAINTS="$SRC/deploy/constraints.txt"

die() { echo "install.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (sudo)"

uninstall() {
  local purge=$1
  local unit
  for unit in atlasd.service atlasd-mlflow.service; do  # one at a time: a missing unit must not skip the other
    systemctl disable --now "$unit" 2>/dev/null || true
  done
  rm -f "$UNIT_DIR/atlasd.service" "$UNIT_DIR/atlasd-mlflow.service"
  systemctl daemon-reload 2>/dev/null || true
  rm -rf "$PREFIX"
  if [ "$purge" = 1 ]; then
    # the database schema is left alone: drop it yourself with `DROP SCHEMA atlasd CASCADE`
    # and remove the triggers `atlasd_sessions_ready_*` on sessions if you want them gone
    rm -rf "$ETC" "$STATE"
    userdel atlasd 2>/dev/null || true
  fi
  echo "atlasd uninstalled$([ "$purge" = 1 ] && echo ' (config, state and user removed)')"
}

# Run a CUDA smoke test (a kernel, torch.compile through Triton) as the service user under the sandbox
# settings of the installed atlasd.service (devices, system calls, /proc, capabilities, file system), so
# a driver, MIG or kernel difference the hardening does not allow shows up before a training run does.
check_gpu() {
  local unit="$UNIT_DIR/atlasd.service" line
  local -a props=()
  [ -f "$unit" ] || die "$unit is not installed"
  while IFS= read -r line; do
    props+=(-p "$line")
  done < <(sed -n '/^\[Service\]/,/^\[/p' "$unit" | grep -E '^(DevicePolicy|DeviceAllow|SystemCall[A-Za-z]*|Protect[A-Za-z]*|Restrict[A-Za-z]*|Private[A-Za-z]*|CapabilityBoundingSet|AmbientCapabilities|NoNewPrivileges|UMask|LockPersonality|RemoveIPC|KeyringMode|ReadWritePaths|StateDirectory|Environment)=')
  systemd-run --quiet --wait --pipe --collect --uid=atlasd --gid=atlasd --working-directory="$STATE" \
    "${props[@]}" "$PREFIX/venv/bin/python" -c '
import torch
assert torch.cuda.is_available(), "CUDA is not available under the unit sandbox"
x = torch.randn(1 << 16, device="cuda")
y = torch.compile(lambda t: torch.sin(t) * 2 + t.cos())(x)
torch.cuda.synchronize()
print("cuda ok:", torch.__version__, torch.cuda.device_count(), "GPU(s),", torch.cuda.get_device_name(0),
      "| nccl", torch.cuda.nccl.version(), "| torch.compile ok:", bool(torch.isfinite(y).all()))
' || die "the CUDA check failed under atlasd.service's sandbox (README, \"Hardening\")"
}

case "${1:-}" in
  --uninstall) uninstall "$([ "${2:-}" = --purge ] && echo 1 || echo 0)"; exit 0 ;;
  --check-gpu) check_gpu; exit 0 ;;
  "") ;;
  *) die "usage: install.sh [--uninstall [--purge] | --check-gpu]" ;;
esac

command -v python3 >/dev/null || die "python3 (3.11+) is required"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "python 3.11+ is required"

id atlasd >/dev/null 2>&1 || useradd --system --home-dir "$STATE" --shell /usr/sbin/nologin atlasd
# the training child needs the GPU device nodes
getent group video >/dev/null && usermod -aG video atlasd || true
getent group render >/dev/null && usermod -aG render atlasd || true

install -d -m 0755 "$PREFIX"
install -d -m 0750 -o atlasd -g atlasd "$STATE" "$STATE/hf-cache"
install -d -m 0750 -o root -g atlasd "$ETC" "$ETC/policies"

[ -f "$CONSTRAINTS" ] || die "missing $CONSTRAINTS"
python3 -m venv "$PREFIX/venv"
# every install is pinned to the versions the test suite ran with (deploy/constraints.txt: the runtime
# closure of atlasd, plus the mlflow[auth] extra for the MLflow UI's login)
pip_install() { "$PREFIX/venv/bin/pip" install --disable-pip-version-check -c "$CONSTRAINTS" "$@"; }
pip_install --upgrade pip >/dev/null
if [ -n "${ATLASD_TORCH_INDEX_URL:-}" ]; then
  # GPU build first (deploy/GPU.md); `torch==2.13.0+cuXXX` satisfies the `torch==2.13.0` pin of both the
  # package and the constraints file. Its CUDA wheels (nvidia-*, triton) are pinned by torch itself.
  pip_install "torch==2.13.0" --index-url "$ATLASD_TORCH_INDEX_URL"
fi
pip_install "$SRC" "mlflow[auth]"

# The env file holds the database password: root-only (0600). systemd reads it for the service
# (EnvironmentFile=) before dropping to the `atlasd` user, so the service user needs no access to it.
if [ ! -f "$ETC/atlasd.env" ]; then
  install -m 0600 -o root -g atlasd "$SRC/deploy/atlasd.env.example" "$ETC/atlasd.env"
  echo "wrote $ETC/atlasd.env from the example: set ATLASD_DB_URL before starting"
fi
chown root:atlasd "$ETC/atlasd.env"
chmod 0600 "$ETC/atlasd.env"   # an older install wrote 0640

# MLflow UI (atlasd-mlflow.service): basic-auth login. mlflow.env (0600 root:root, read by systemd only)
# gets a random session key and a random first admin password; mlflow-auth.ini holds no secret.
if [ ! -f "$ETC/mlflow.env" ]; then
  secret() { python3 -c 'import secrets; print(secrets.token_urlsafe(32))'; }
  tmp="$(mktemp "$ETC/.mlflow.env.XXXXXX")"   # 0600 from the start; renamed into place only when complete
  sed -e "s|^MLFLOW_FLASK_SERVER_SECRET_KEY=GENERATED\$|MLFLOW_FLASK_SERVER_SECRET_KEY=$(secret)|" \
      -e "s|^MLFLOW_AUTH_ADMIN_PASSWORD=GENERATED\$|MLFLOW_AUTH_ADMIN_PASSWORD=$(secret)|" \
      "$SRC/deploy/mlflow.env.example" >"$tmp"
  # an install from before the login read ATLASD_MLFLOW_TRACKING_URI for the UI: keep showing that store
  store="$(sed -n 's/^ATLASD_MLFLOW_TRACKING_URI=//p' "$ETC/atlasd.env" | tail -n 1)"
  case "$store" in
    "" | http://* | https://*) ;;
    *) printf 'MLFLOW_BACKEND_STORE_URI=%s\n' "$store" >>"$tmp" ;;
  esac
  mv "$tmp" "$ETC/mlflow.env"
  echo "wrote $ETC/mlflow.env: the MLflow UI's first admin password is MLFLOW_AUTH_ADMIN_PASSWORD there (user: admin)"
fi
chown root:root "$ETC/mlflow.env"
chmod 0600 "$ETC/mlflow.env"
if [ ! -f "$ETC/mlflow-auth.ini" ]; then
  install -m 0640 -o root -g atlasd "$SRC/deploy/mlflow-auth.ini" "$ETC/mlflow-auth.ini"
fi
if [ -z "$(ls -A "$ETC/policies")" ]; then
  install -m 0640 -o root -g atlasd "$SRC"/policies/*.yaml "$ETC/policies/"
  echo "installed example policies into $ETC/policies (edit them; \`atlasd policies validate\` checks them)"
fi

install -m 0644 "$SRC/systemd/atlasd.service" "$SRC/systemd/atlasd-mlflow.service" "$UNIT_DIR/"
systemctl daemon-reload

# migrate as the service user with the environment the service gets: systemd reads the root-only env file
# (EnvironmentFile=, as for the unit; not a shell `source`), so the password is in no command line.
# Only the ATLASD_DB_URL line counts: comments may say CHANGE-ME.
migrate=(systemd-run --quiet --wait --pipe --collect --uid=atlasd --gid=atlasd --working-directory=/
         -p EnvironmentFile="$ETC/atlasd.env" -p UMask=0077 --setenv=ATLASD_STATE_DIR="$STATE"
         "$PREFIX/venv/bin/atlasd" db migrate)
if grep -q '^ATLASD_DB_URL=.*CHANGE-ME' "$ETC/atlasd.env"; then
  echo "skipping \`atlasd db migrate\`: ATLASD_DB_URL in $ETC/atlasd.env still has the example password;"
  echo "edit it, then run: sudo ${migrate[*]}"
else
  "${migrate[@]}"
fi

systemctl enable atlasd.service
if systemctl is-active --quiet atlasd.service; then
  echo "installed. atlasd is running the previous version: systemctl restart atlasd"
else
  echo "installed. Start with: systemctl start atlasd   (logs: journalctl -u atlasd -f)"
fi
if systemctl is-active --quiet atlasd-mlflow.service; then
  echo "the MLflow UI is running the previous version: systemctl restart atlasd-mlflow"
fi
