//! latchkey-zookeeper (to be built)
