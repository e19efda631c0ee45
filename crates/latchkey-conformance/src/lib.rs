//! latchkey-conformance (to be built)
