-- wrk script for the benchmark: POST a small chat completion whose content carries a
-- counter, so no two requests are alike (a cache configured on the route always misses).
--   wrk ... -s bench/wrk/chat.lua URL -- [AUTHORIZATION] [PREFIX]
-- AUTHORIZATION: the whole header value ("Bearer sk-…"), or "" for none.
-- PREFIX: text put before the counter (make it unique per run).
-- done() prints key=value lines (latency in microseconds).

local counter = 0
local headers = { ["Content-Type"] = "application/json" }
local prefix = ""

function init(args)
  if args[1] ~= nil and args[1] ~= "" then
    headers["Authorization"] = args[1]
  end
  if args[2] ~= nil then
    prefix = args[2]
  end
end

function request()
  counter = counter + 1
  local body = '{"model":"bench","messages":[{"role":"user","content":"hello ' ..
    prefix .. '-' .. counter .. '"}]}'
  return wrk.format("POST", nil, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("requests=%d\n", summary.requests))
  io.write(string.format("duration_us=%d\n", summary.duration))
  io.write(string.format("rps=%.1f\n", summary.requests / (summary.duration / 1e6)))
  io.write(string.format("errors=%d\n", e.connect + e.read + e.write + e.status + e.timeout))
  io.write(string.format("status_errors=%d\n", e.status))
  for _, p in ipairs({ 50, 90, 99, 99.9 }) do
    io.write(string.format("lat_p%s_us=%d\n", tostring(p):gsub("%.", "_"), latency:percentile(p)))
  end
  io.write(string.format("lat_mean_us=%.1f\n", latency.mean))
  io.write(string.format("lat_max_us=%d\n", latency.max))
end
