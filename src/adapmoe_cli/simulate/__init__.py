"""`adapmoe simulate`: replays a routing trace through the runtime's own `ExpertManager`, cache and
policies with a simulated loader on a simulated clock (`timing`), for hardware described by a file
(`hardware`) and a model described by its published shape (`models`), beside the limits no policy can
beat (`limits`). Nothing here reads an expert or touches a tensor of a model, except `calibrate`."""
