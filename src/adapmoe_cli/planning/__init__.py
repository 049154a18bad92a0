"""Decisions made from a profile: thresholds of the adaptive gate (`gate_rules`), cache slots per layer
(`costs` replays the routing trace through the runtime's own manager and policies, `allocate` solves the
exact dynamic program), and the versioned plan file the runtime reads (`plan_file`)."""
