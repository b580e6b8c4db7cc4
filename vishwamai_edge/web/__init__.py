"""What the HTTP front ends (`serve`, `ui`) share: the listening address, the Host check, body limits."""
