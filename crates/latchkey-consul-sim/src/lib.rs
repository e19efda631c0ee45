//! Consul HTTP-API simulator (to be built)
