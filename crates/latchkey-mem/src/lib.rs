//! latchkey-mem (to be built)
