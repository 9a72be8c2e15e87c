#!/usr/bin/env bash
# Install atlasd as a systemd service on this machine (run as root from a checkout):
#   sudo deploy/install.sh            # CPU torch (the pinned wheel)
#   sudo ATLASD_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 deploy/install.sh   # GPU (deploy/GPU.md)
#   sudo deploy/install.sh --uninstall [--purge]
# Creates the `atlasd` user, /opt/atlasd/venv, /etc/atlasd (env file + policies), /var/lib/atlasd,
# installs the units, runs `atlasd db migrate`, and enables (does not start) the service.
set -euo pipefail

PREFIX=/opt/atlasd
ETC=/etc/atlasd
STATE=/var/lib/atlasd
UNIT_DIR=/etc/systemd/system
SRC="$(cd "$(dirname "$0")/.." && pwd)"

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

case "${1:-}" in
  --uninstall) uninstall "$([ "${2:-}" = --purge ] && echo 1 || echo 0)"; exit 0 ;;
  "") ;;
  *) die "usage: install.sh [--uninstall [--purge]]" ;;
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

python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --upgrade pip >/dev/null
if [ -n "${ATLASD_TORCH_INDEX_URL:-}" ]; then
  # GPU build first (deploy/GPU.md); `torch==2.13.0+cuXXX` satisfies the package's `torch==2.13.0` pin
  "$PREFIX/venv/bin/pip" install "torch==2.13.0" --index-url "$ATLASD_TORCH_INDEX_URL"
fi
"$PREFIX/venv/bin/pip" install "$SRC"

if [ ! -f "$ETC/atlasd.env" ]; then
  install -m 0640 -o root -g atlasd "$SRC/deploy/atlasd.env.example" "$ETC/atlasd.env"
  echo "wrote $ETC/atlasd.env from the example: set ATLASD_DB_URL before starting"
fi
if [ -z "$(ls -A "$ETC/policies")" ]; then
  install -m 0640 -o root -g atlasd "$SRC"/policies/*.yaml "$ETC/policies/"
  echo "installed example policies into $ETC/policies (edit them; \`atlasd policies validate\` checks them)"
fi

install -m 0644 "$SRC/systemd/atlasd.service" "$SRC/systemd/atlasd-mlflow.service" "$UNIT_DIR/"
systemctl daemon-reload

# migrate as the service user, reading the env file as atlasd does (ATLASD_ENV_FILE, not a shell `source`:
# an EnvironmentFile is not shell syntax). Only the ATLASD_DB_URL line counts: comments may say CHANGE-ME.
migrate=(runuser -u atlasd -- env ATLASD_ENV_FILE="$ETC/atlasd.env" ATLASD_STATE_DIR="$STATE" "$PREFIX/venv/bin/atlasd" db migrate)
if grep -q '^ATLASD_DB_URL=.*CHANGE-ME' "$ETC/atlasd.env"; then
  echo "skipping \`atlasd db migrate\`: ATLASD_DB_URL in $ETC/atlasd.env still has the example password;"
  echo "edit it, then run: sudo ${migrate[*]}"
else
  (cd / && "${migrate[@]}")
fi

systemctl enable atlasd.service
if systemctl is-active --quiet atlasd.service; then
  echo "installed. atlasd is running the previous version: systemctl restart atlasd"
else
  echo "installed. Start with: systemctl start atlasd   (logs: journalctl -u atlasd -f)"
fi
