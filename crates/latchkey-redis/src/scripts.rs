//! The Lua scripts. Every write goes through one of them so that the
//! revision bump, the value, the key index and the change stream change
//! together, atomically. Loaded once per server and called by SHA
//! (`EVALSHA`); `redis::Script` reloads a script the server forgot
//! (`NOSCRIPT` after a restart or `SCRIPT FLUSH`); on a cluster a
//! `NOSCRIPT` is answered by `EVAL` of the source, routed like the
//! `EVALSHA` (see `conn::ClusterScripts`).
//!
//! Numbers: Lua numbers are doubles, and Redis turns a Lua number into a
//! string with `%.14g`. Revisions are therefore formatted with
//! `string.format('%d', ...)` before they are stored, and compared as
//! numbers only below 2^53.

use redis::Script;
use std::collections::HashMap;
use std::sync::OnceLock;

/// Helpers shared by the write scripts. `KEYS[1]` is the revision counter,
/// `KEYS[2]` the key index, `KEYS[3]` the change stream and `KEYS[4]` the
/// expiry schedule (a sorted set: key -> deadline in ms, server time).
const PRELUDE: &str = r#"
local function cur_rev(k)
  local r = redis.call('HGET', k, 'r')
  if r then return tonumber(r) end
  return 0
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function kv_put(k, ukey, val, ttl, rev, seq, maxlen)
  local rs = string.format('%d', rev)
  local id = string.format('%d-%d', rev, seq)
  redis.call('DEL', k)
  redis.call('ZADD', KEYS[2], 0, ukey)
  if ttl > 0 then
    local ts = string.format('%d', ttl)
    redis.call('HSET', k, 'v', val, 'r', rs, 't', ts)
    redis.call('PEXPIRE', k, ts)
    redis.call('ZADD', KEYS[4], string.format('%d', now_ms() + ttl), ukey)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, id, 'k', ukey, 'e', 'p', 'v', val, 't', ts)
  else
    redis.call('HSET', k, 'v', val, 'r', rs)
    redis.call('ZREM', KEYS[4], ukey)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, id, 'k', ukey, 'e', 'p', 'v', val)
  end
end
local function kv_del(k, ukey, rev, seq, maxlen)
  redis.call('DEL', k)
  redis.call('ZREM', KEYS[2], ukey)
  redis.call('ZREM', KEYS[4], ukey)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen,
    string.format('%d-%d', rev, seq), 'k', ukey, 'e', 'd')
end
"#;

/// put: KEYS rev idx log ttl kv; ARGV ukey value ttl_ms if_absent(0/1)
/// if_revision('' = none) maxlen. Returns {1, rev} or {0, current}.
const PUT: &str = r#"
local cur = cur_rev(KEYS[5])
if ARGV[4] == '1' and cur ~= 0 then return {0, cur} end
if ARGV[5] ~= '' and cur ~= tonumber(ARGV[5]) then return {0, cur} end
local rev = redis.call('INCR', KEYS[1])
kv_put(KEYS[5], ARGV[1], ARGV[2], tonumber(ARGV[3]), rev, 0, ARGV[6])
return {1, rev}
"#;

/// delete: KEYS rev idx log ttl kv; ARGV ukey if_revision('' = none) maxlen.
/// Returns {1, deleted(0/1)} or {0, current}.
const DELETE: &str = r#"
local cur = cur_rev(KEYS[5])
if ARGV[2] ~= '' and cur ~= tonumber(ARGV[2]) then return {0, cur} end
if cur == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {1, 0}
end
local rev = redis.call('INCR', KEYS[1])
kv_del(KEYS[5], ARGV[1], rev, 0, ARGV[3])
return {1, 1}
"#;

/// txn: KEYS rev idx log ttl, then every key the txn names (hashes, lock keys,
/// fencing counters). ARGV: [1] maxlen, [2] length of the kv prefix,
/// [3] number of compares, [4] first ARGV of the `then` ops, [5] their
/// count, [6] first ARGV of the `otherwise` ops, [7] their count, then the
/// compares from [8] on (a tag and its operands each), then the two
/// branches (a tag, a KEYS index and operands per op).
/// Every compare is evaluated before anything is written: Redis has no
/// rollback, so a script must decide first and write after.
/// Returns {succeeded, revision after, {result per op}}.
const TXN: &str = r#"
local maxlen = ARGV[1]
local plen = tonumber(ARGV[2])
local i = 8
local function nxt() local v = ARGV[i]; i = i + 1; return v end
local ok = true
for _ = 1, tonumber(ARGV[3]) do
  local tag = nxt()
  if tag == 'r' then
    local k = KEYS[tonumber(nxt())]
    local op = nxt()
    local want = tonumber(nxt())
    local cur = cur_rev(k)
    local holds
    if op == '=' then holds = cur == want
    elseif op == '!' then holds = cur ~= want
    elseif op == '<' then holds = cur < want
    else holds = cur > want end
    ok = ok and holds
  elseif tag == 'v' then
    local k = KEYS[tonumber(nxt())]
    local want = nxt()
    local v = redis.call('HGET', k, 'v')
    ok = ok and v ~= false and v == want
  elseif tag == 'e' then
    ok = ok and redis.call('EXISTS', KEYS[tonumber(nxt())]) == 1
  elseif tag == 'a' then
    ok = ok and redis.call('EXISTS', KEYS[tonumber(nxt())]) == 0
  elseif tag == 'h' then
    local lk = KEYS[tonumber(nxt())]
    local fk = KEYS[tonumber(nxt())]
    local owner = nxt()
    local token = nxt()
    ok = ok and redis.call('GET', lk) == owner and redis.call('GET', fk) == token
  else
    return redis.error_reply('latchkey: unknown compare tag')
  end
end
local nops
if ok then i = tonumber(ARGV[4]); nops = tonumber(ARGV[5])
else i = tonumber(ARGV[6]); nops = tonumber(ARGV[7]) end
local rev = nil
local seq = 0
local results = {}
for n = 1, nops do
  local tag = nxt()
  local k = KEYS[tonumber(nxt())]
  local ukey = string.sub(k, plen + 1)
  if tag == 'p' then
    local val = nxt()
    local ttl = tonumber(nxt())
    if rev == nil then rev = redis.call('INCR', KEYS[1]) end
    kv_put(k, ukey, val, ttl, rev, seq, maxlen)
    seq = seq + 1
    results[n] = rev
  elseif tag == 'd' then
    if redis.call('EXISTS', k) == 1 then
      if rev == nil then rev = redis.call('INCR', KEYS[1]) end
      kv_del(k, ukey, rev, seq, maxlen)
      seq = seq + 1
      results[n] = 1
    else
      redis.call('ZREM', KEYS[2], ukey)
      results[n] = 0
    end
  else
    local h = redis.call('HMGET', k, 'v', 'r', 't')
    if h[2] then results[n] = {h[1], h[2], h[3] or '0'} else results[n] = {} end
  end
end
return {ok and 1 or 0, redis.call('GET', KEYS[1]) or '0', results}
"#;

/// sweep: KEYS rev idx log ttl; ARGV kv prefix, maxlen. Turns every key
/// whose deadline passed and which Redis has expired into a delete event
/// (a new revision each), as a write would have. Returns the ms until the
/// next deadline (-1: none). A key still there at its deadline (the clocks
/// of `TIME` and of expiry differ by a millisecond) stays scheduled.
const SWEEP: &str = r#"
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 1000)
for _, ukey in ipairs(due) do
  if redis.call('EXISTS', ARGV[1] .. ukey) == 0 then
    local rev = redis.call('INCR', KEYS[1])
    kv_del(ARGV[1] .. ukey, ukey, rev, 0, ARGV[2])
  end
end
local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
if #first == 0 then return -1 end
local wait = tonumber(first[2]) - now
if wait < 1 then wait = 1 end
return wait
"#;

/// list: KEYS idx; ARGV kv prefix, min, max (ZRANGEBYLEX bounds), limit
/// (0 = none), keys_only (0/1). Drops index entries whose key expired.
/// Returns {{key, value, revision, ttl_ms}, ...} in key order.
const LIST: &str = r#"
local out = {}
local lim = tonumber(ARGV[4])
local min = ARGV[2]
local batch = 512
while true do
  local ms = redis.call('ZRANGEBYLEX', KEYS[1], min, ARGV[3], 'LIMIT', 0, batch)
  for _, m in ipairs(ms) do
    local h = redis.call('HMGET', ARGV[1] .. m, 'v', 'r', 't')
    if h[2] then
      local v = h[1]
      if ARGV[5] == '1' then v = '' end
      out[#out + 1] = {m, v, h[2], h[3] or '0'}
      if lim > 0 and #out >= lim then return out end
    else
      -- the key expired: forget it so it never shows again
      redis.call('ZREM', KEYS[1], m)
    end
  end
  if #ms < batch then break end
  min = '(' .. ms[#ms]
end
return out
"#;

/// watch start: KEYS rev log epoch; ARGV a fresh random epoch. Returns
/// {current revision, highest revision trimmed from the stream (0: none),
/// epoch}. The epoch key is created by the first watch and vanishes with
/// the rest of the namespace's data (a restart without persistence), so a
/// watch that finds another epoch knows its history is gone even if new
/// writes have pushed the counter past where it was.
const WATCH_START: &str = r#"
redis.call('SET', KEYS[3], ARGV[1], 'NX')
local cur = redis.call('GET', KEYS[1]) or '0'
-- Revisions in the stream are contiguous from 1, so everything before
-- its first entry was trimmed (an empty stream: everything).
local trimmed = '0'
if redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  local first, last = nil, '0'
  for n = 1, #info, 2 do
    if info[n] == 'first-entry' and type(info[n + 1]) == 'table' then
      first = string.match(info[n + 1][1], '^(%d+)')
    elseif info[n] == 'last-generated-id' then
      last = string.match(info[n + 1], '^(%d+)') or '0'
    end
  end
  if first then
    trimmed = string.format('%d', tonumber(first) - 1)
  else
    trimmed = last
  end
end
return {cur, trimmed, redis.call('GET', KEYS[3])}
"#;

/// acquire: KEYS lock fence queue waiters qseq; ARGV owner ttl_ms mode
/// ('w' wait, 't' try) channel-prefix refresh_ms.
///
/// The lock is `SET lock <owner> PX ttl` (what `SET NX PX` clients see) plus
/// a fencing token from the lock's counter. Waiters queue in `queue`
/// (owner -> ticket, FIFO) and keep a lease in `waiters` (owner -> deadline,
/// server ms, two refresh periods ahead, renewed by every attempt); a
/// waiter whose lease ran out (it crashed without cancelling) is dropped
/// here. A free lock
/// goes to the head of the queue only. Idempotent per owner.
///
/// Returns {1, token}, or {0, ms to wait at most before trying again}: the
/// holder's PTTL for the head (an expiry publishes nothing), the head's
/// lease for the others (a crashed head publishes nothing), and never more
/// than one refresh period (the waiter's own lease). A try returns
/// {0, 0} without queueing.
const ACQUIRE: &str = r#"
local owner, refresh = ARGV[1], tonumber(ARGV[5])
local now = now_ms()
for _, o in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)) do
  redis.call('ZREM', KEYS[3], o)
  redis.call('ZREM', KEYS[4], o)
end
local cur = redis.call('GET', KEYS[1])
if cur == owner then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(redis.call('GET', KEYS[2]))}
end
local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
if not cur and (head == nil or head == owner) then
  redis.call('SET', KEYS[1], owner, 'PX', ARGV[2])
  redis.call('ZREM', KEYS[3], owner)
  redis.call('ZREM', KEYS[4], owner)
  return {1, redis.call('INCR', KEYS[2])}
end
if ARGV[3] == 't' then return {0, 0} end
if not redis.call('ZSCORE', KEYS[3], owner) then
  redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[5]), owner)
end
redis.call('ZADD', KEYS[4], string.format('%d', now + 2 * refresh), owner)
head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
if not cur and head ~= owner then
  -- the lock is free and reserved for the head: make sure it knows
  redis.call('PUBLISH', ARGV[4] .. head, 'turn')
end
local bound = refresh
if head == owner then
  local p = redis.call('PTTL', KEYS[1])
  if p >= 0 and p < bound then bound = p end
else
  local lease = redis.call('ZSCORE', KEYS[4], head)
  if lease then
    local d = tonumber(lease) - now
    if d < bound then bound = d end
  else
    -- a queue entry without a lease is nobody's: drop it, look again soon
    redis.call('ZREM', KEYS[3], head)
    bound = 1
  end
end
if bound < 1 then bound = 1 end
return {0, bound}
"#;

/// release: KEYS lock queue; ARGV owner channel-prefix. Compare-and-delete,
/// then wake the head of the queue (only it). Returns 1 if it was ours.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if head then redis.call('PUBLISH', ARGV[2] .. head, 'released') end
  return 1
end
return 0
"#;

/// leave: KEYS lock queue waiters; ARGV owner channel-prefix. A waiter that
/// gives up (cancelled, timed out): leaves the queue, releases the lock if
/// an attempt in flight got it, and wakes the new head if the lock is free.
const LEAVE: &str = r#"
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('EXISTS', KEYS[1]) == 0 then
  local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if head then redis.call('PUBLISH', ARGV[2] .. head, 'turn') end
end
return 1
"#;

/// renew: KEYS every lock key of one TTL; ARGV ttl_ms, then the owners in
/// the same order. Extends the ones still ours; returns the 1-based
/// positions of those that are gone.
const RENEW: &str = r#"
local gone = {}
for n = 1, #KEYS do
  if redis.call('GET', KEYS[n]) == ARGV[n + 1] then
    redis.call('PEXPIRE', KEYS[n], ARGV[1])
  else
    gone[#gone + 1] = n
  end
end
return gone
"#;

/// All scripts, compiled (hashed) once per process.
pub(crate) struct Scripts {
    pub put: Script,
    pub delete: Script,
    pub txn: Script,
    pub list: Script,
    pub sweep: Script,
    pub watch_start: Script,
    pub acquire: Script,
    pub release: Script,
    pub leave: Script,
    pub renew: Script,
    /// Source of each script by SHA1, for `EVAL` after `NOSCRIPT` on a
    /// cluster (see `conn::ClusterScripts`).
    sources: HashMap<String, String>,
}

impl Scripts {
    /// The source of the script whose SHA1 (hex) is `sha`.
    pub(crate) fn source(&self, sha: &[u8]) -> Option<&str> {
        let sha = std::str::from_utf8(sha).ok()?.to_ascii_lowercase();
        self.sources.get(&sha).map(String::as_str)
    }
}

pub(crate) fn scripts() -> &'static Scripts {
    static S: OnceLock<Scripts> = OnceLock::new();
    S.get_or_init(|| {
        let mut sources = HashMap::new();
        let mut script = |code: String| {
            let s = Script::new(&code);
            sources.insert(s.get_hash().to_ascii_lowercase(), code);
            s
        };
        Scripts {
            put: script(format!("{PRELUDE}{PUT}")),
            delete: script(format!("{PRELUDE}{DELETE}")),
            txn: script(format!("{PRELUDE}{TXN}")),
            list: script(LIST.to_string()),
            sweep: script(format!("{PRELUDE}{SWEEP}")),
            watch_start: script(WATCH_START.to_string()),
            acquire: script(format!("{PRELUDE}{ACQUIRE}")),
            release: script(RELEASE.to_string()),
            leave: script(LEAVE.to_string()),
            renew: script(RENEW.to_string()),
            sources,
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_script_source_is_found_by_its_sha() {
        let s = super::scripts();
        for sc in [&s.put, &s.txn, &s.acquire, &s.renew, &s.watch_start] {
            let src = s.source(sc.get_hash().as_bytes()).expect("known SHA");
            assert_eq!(redis::Script::new(src).get_hash(), sc.get_hash());
        }
        assert!(s.source(b"0000").is_none());
    }
}
