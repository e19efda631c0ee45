//! Tests of the Consul HTTP-API **simulator**, over real HTTP, one test per
//! documented behaviour. Waits are measured against deadlines; nothing
//! sleeps to synchronize.

mod acl;
mod bin;
mod blocking;
mod common;
mod kv;
mod session;
mod txn;
