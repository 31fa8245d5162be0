-- wrk script for benchmarks/ocsp.py: pre-made OCSP requests, one after the other.
--
--   wrk -s ocsp.lua -H 'Content-Type: application/ocsp-request' URL -- REQUESTS_FILE
--
-- REQUESTS_FILE holds one OCSP request a line. A line starting with "/" is the path of an RFC 5019
-- GET (the URL-encoded base64 request after the responder's path). Any other line is POSTed: its
-- DER in hex, then optionally a space and the 0-based offset of a 16-byte nonce inside it. A
-- request without an offset is sent as it is (no nonce: the cacheable RFC 5019 kind). A request with an offset gets a fresh nonce every
-- time it is sent (thread letter + a 15-digit counter), so a responder cannot answer it from a
-- cache: it must sign. Each thread decodes every request at start (nothing but the nonce is
-- built while measuring) and cycles over them, the threads starting at different places.
-- At the end one line of JSON goes to standard output, as benchmarks/wrk/issuance.lua writes it.

-- wrk checks the address before the run by connecting and closing at once (wrk.resolve in its
-- built-in wrk.lua). `openssl ocsp -port` (OpenSSL 3.0 to 3.x, a known bug) then spins at 100 % CPU
-- on that closed connection and never answers anyone again. So this script resolves the address
-- without the test connection: a responder that is not listening shows up as connect errors.
function wrk.resolve(host, service)
   wrk.addrs = wrk.lookup(host, service)
end

local threads = {}
local counter = 0

function setup(thread)
   thread:set("offset", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

local bodies = {}
local paths = {}
local nonce_at = {}
local count = 0
local position = 0
local sent = 0
local letter = "A"

local function unhex(text)
   return (text:gsub("..", function(pair) return string.char(tonumber(pair, 16)) end))
end

function init(args)
   local path = args[1]
   if path == nil then
      error("usage: wrk -s ocsp.lua URL -- REQUESTS_FILE")
   end
   for line in io.lines(path) do
      local der, at = line:match("^(%x+)%s*(%d*)$")
      if line:sub(1, 1) == "/" then
         count = count + 1
         paths[count] = line
      elseif der ~= nil then
         count = count + 1
         bodies[count] = unhex(der)
         nonce_at[count] = tonumber(at)  -- nil without an offset
      end
   end
   if count == 0 then
      error("no OCSP requests in " .. path)
   end
   letter = string.char(65 + (offset or 0) % 26)
   position = ((offset or 0) * 7919) % count
end

function request()
   position = position % count + 1
   if paths[position] ~= nil then
      return wrk.format("GET", paths[position])
   end
   local body = bodies[position]
   local at = nonce_at[position]
   if at ~= nil then
      sent = sent + 1
      body = body:sub(1, at) .. letter .. string.format("%015d", sent) .. body:sub(at + 17)
   end
   return wrk.format("POST", nil, nil, body)
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      '{"requests": %d, "duration_us": %d, "bytes": %d, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
