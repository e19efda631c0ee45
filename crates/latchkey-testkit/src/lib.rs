//! latchkey-testkit (to be built)
