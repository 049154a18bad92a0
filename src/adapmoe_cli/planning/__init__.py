"""Decisions made from a profile: thresholds of the adaptive gate (`gate_rules`), cache slots per layer
(`costs` replays the routing trace through the runtime's own manager and policies, `allocate` solves the
exact dynamic program), and the versioned plan file the runtime reads (`plan_file`)."""

#: tokens of calibration text the quality search scores each gate on
CALIBRATION_TOKENS = 16384
#: tokens of held-out text the bench reports each gate's perplexity on
HELDOUT_TOKENS = 32768
