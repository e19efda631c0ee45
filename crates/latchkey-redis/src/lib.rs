//! latchkey-redis (to be built)
