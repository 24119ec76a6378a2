"""Pure domain logic: levels, matching, normalisation, payloads. No I/O, no frameworks."""
