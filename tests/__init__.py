"""modalmesh tests: unit/ mirrors the source tree; integration/ starts real processes."""
