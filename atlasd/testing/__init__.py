"""What the tests, the benchmarks and the demo share to drive atlasd from outside: throw-away
PostgreSQL databases (:mod:`.pg`), the daemon as a child process (:mod:`.daemon`) and writers
acting as the Atlas SDK (:mod:`.sdk`). Never imported by the daemon or the trainer."""
