"""When the keep bits update and to what: schedules, the update budget and the per-fit Plan. Numbers only."""
