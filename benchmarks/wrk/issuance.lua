-- wrk script for benchmarks/issuance.py: POST pre-made request bodies, one after the other.
--
--   wrk -s issuance.lua URL -- BODIES_FILE
--
-- BODIES_FILE holds one JSON request body a line. Each wrk thread reads them all at start
-- (nothing is built while measuring) and cycles over them, the threads starting at different
-- places so they do not send the same body at the same time. Headers (Authorization,
-- Content-Type) come from wrk's -H options. At the end one line of JSON goes to standard output:
-- requests, errors by kind, and latency percentiles in microseconds.

local threads = {}
local counter = 0

function setup(thread)
   thread:set("offset", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

local bodies = {}
local count = 0
local position = 0

function init(args)
   local path = args[1]
   if path == nil then
      error("usage: wrk -s issuance.lua URL -- BODIES_FILE")
   end
   for line in io.lines(path) do
      if #line > 0 then
         count = count + 1
         bodies[count] = line
      end
   end
   if count == 0 then
      error("no request bodies in " .. path)
   end
   -- threads start a prime stride apart
   position = ((offset or 0) * 7919) % count
   wrk.method = "POST"
end

function request()
   position = position % count + 1
   return wrk.format(nil, nil, nil, bodies[position])
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
