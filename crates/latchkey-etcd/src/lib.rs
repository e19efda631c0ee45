//! latchkey-etcd (to be built)
