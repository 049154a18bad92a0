"""`adapmoe profile`: measurements the adaptive gate and the cache planner decide from.

- `trace`: the routing trace (token × layer → top-k ids and weights, and the next-layer prediction)
  and the statistics computed from it (pure array functions, reused by plan-cache and simulate);
- `collect`: runs calibration text through an engine and records the trace and the sensitivities;
- `record`: an observer that records the routing of a run as a trace (replayed by `bench --simulate`);
- `profile_file`: the versioned on-disk format (JSON statistics + safetensors trace) and its reader;
- `profiler`: `make_profile()` behind the command, and `ensure_profile()` for commands that need one."""
