//! Exit codes. A command run under `latchkey lock` passes its own status
//! through; these are latchkey's own outcomes.

/// A key asked for does not exist (`kv get`), or a condition failed (`kv put --if-*`).
pub const NOT_FOUND_OR_CONFLICT: u8 = 1;
/// The lock could not be taken in the time allowed (`--wait`), like timeout(1).
pub const LOCK_TIMEOUT: u8 = 124;
/// latchkey itself failed (bad URL, server unavailable, bad arguments).
pub const ERROR: u8 = 125;
/// The command could not be started.
pub const CANNOT_RUN: u8 = 127;
/// The lock was lost while the command ran; the command was terminated.
pub const LOCK_LOST: u8 = 75;
