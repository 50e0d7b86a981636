"""The Lua scripts of the Redis broker: each one moves a job between the stream, the delayed set and
the dead-letter hash atomically, and does nothing when run twice (a reply lost with the connection
is retried safely). Times come from the server's clock (TIME), one clock for every host."""

# Shared prologue: the server's time in seconds.
_NOW = "local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1e6\n"

# Is ARGV[2] (an entry id) still pending for ARGV[3] (the consumer)? Otherwise another consumer
# took the job over after job_timeout, and this delivery no longer owns it.
_HOLDER = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
"""

# KEYS: delayed. ARGV: delay, then id, payload pairs. Jobs put with a delay wait in a sorted set.
PUT_DELAYED = _NOW + """
local due = now + tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], due, cjson.encode({i = ARGV[i], d = ARGV[i + 1], a = 1, t = now}))
end
return #ARGV
"""

# KEYS: stream, delayed. ARGV: limit. Moves due delayed jobs into the stream; returns the seconds
# until the next one is due, or -1.
MOVE_DUE = _NOW + """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  local job = cjson.decode(member)
  if job.e then
    redis.call('XADD', KEYS[1], '*', 'i', job.i, 'd', job.d, 'a', job.a, 't', job.t, 'e', job.e)
  else
    redis.call('XADD', KEYS[1], '*', 'i', job.i, 'd', job.d, 'a', job.a, 't', job.t)
  end
  redis.call('ZREM', KEYS[2], member)
end
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #first == 0 then return '-1' end
return tostring(tonumber(first[2]) - now)
"""

# KEYS: stream. ARGV: group, consumer, min idle ms, count. Takes over jobs whose consumer has not
# acknowledged them for job_timeout; returns {entries, delivery counts}.
CLAIM = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', ARGV[4])
local entries, counts = {}, {}
for _, entry in ipairs(r[2]) do
  if entry and entry ~= false then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)
    if #p > 0 then
      entries[#entries + 1] = entry
      counts[#counts + 1] = p[1][4]
    end
  end
end
return {entries, counts}
"""

# KEYS: stream, done-counter prefix. ARGV: group, entry ids (a batch of done jobs). Only entries
# newly acknowledged are counted (a resent ack counts nothing); deleting an entry that XACK did not
# acknowledge is harmless: a handed-back, retried, dead or acknowledged entry is deleted already.
ACK_MANY = _NOW + """
local n = 0
for first = 2, #ARGV, 1000 do
  local last = math.min(first + 999, #ARGV)
  n = n + redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, first, last))
  redis.call('XDEL', KEYS[1], unpack(ARGV, first, last))
end
if n > 0 then
  local bucket = KEYS[2] .. math.floor(now)
  redis.call('INCRBY', bucket, n)
  redis.call('EXPIRE', bucket, 120)
end
return n
"""

# KEYS: stream, delayed. ARGV: group, entry id, consumer, job id, payload, next attempt, enqueued_at,
# error, delay.
RETRY = _NOW + _HOLDER + """
local delay = tonumber(ARGV[9])
if delay > 0 then
  redis.call('ZADD', KEYS[2], now + delay,
             cjson.encode({i = ARGV[4], d = ARGV[5], a = tonumber(ARGV[6]), t = tonumber(ARGV[7]),
                           e = ARGV[8]}))
else
  redis.call('XADD', KEYS[1], '*', 'i', ARGV[4], 'd', ARGV[5], 'a', ARGV[6], 't', ARGV[7], 'e', ARGV[8])
end
return 1
"""

# KEYS: stream, dead hash. ARGV: group, entry id, consumer, job id, payload, attempts, enqueued_at, error.
DEAD = _NOW + _HOLDER + """
redis.call('HSET', KEYS[2], ARGV[4], cjson.encode({i = ARGV[4], d = ARGV[5], a = tonumber(ARGV[6]),
           t = tonumber(ARGV[7]), e = ARGV[8], f = now}))
return 1
"""

# KEYS: stream. ARGV: group, entry id, consumer, job id, payload, attempt, enqueued_at. Not started:
# the same attempt, available at once.
HAND_BACK = _HOLDER + """
redis.call('XADD', KEYS[1], '*', 'i', ARGV[4], 'd', ARGV[5], 'a', ARGV[6], 't', ARGV[7])
return 1
"""

# KEYS: stream, dead hash. ARGV: ids (none: all). Returns the ids moved back to the queue.
RETRY_DEAD = """
local ids = ARGV
if #ids == 0 then ids = redis.call('HKEYS', KEYS[2]) end
local moved = {}
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', KEYS[2], id)
  if raw then
    local job = cjson.decode(raw)
    redis.call('XADD', KEYS[1], '*', 'i', job.i, 'd', job.d, 'a', 1, 't', job.t)
    redis.call('HDEL', KEYS[2], id)
    moved[#moved + 1] = id
  end
end
return moved
"""
