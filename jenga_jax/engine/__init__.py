"""Engine: the glue between the host manager and the jitted device steps."""
