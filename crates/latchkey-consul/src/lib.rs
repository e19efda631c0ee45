//! latchkey-consul (to be built)
