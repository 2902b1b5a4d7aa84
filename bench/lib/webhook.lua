-- wrk script: POSTs pre-signed Kora webhooks, a different event id on every request.
-- Arguments (after --): <request file prefix> <webhook path> [signature header, default X-Signature]
-- Each wrk thread reads its own file <prefix>.<thread number> (written by bench.py gen-requests), so
-- no two threads send the same event; a thread that runs out starts over (the sidecar then answers
-- duplicates, which bench/run counts from /metrics and reports).
local counter = 0

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

function init(args)
  local prefix, path = args[1], args[2]
  local sig_header = args[3] or "X-Signature"
  reqs = {}
  for line in io.lines(prefix .. "." .. tid) do
    local ts, sig, id, body = line:match("^(%d+)\t(%x+)\t([^\t]+)\t(.*)$")
    local headers = {
      ["Content-Type"] = "application/json",
      ["X-Timestamp"] = ts,
      ["X-Signature-Algorithm"] = "sha256",
      ["X-Webhook-ID"] = id,
      ["X-Event-Type"] = "verification.completed",
    }
    headers[sig_header] = sig
    reqs[#reqs + 1] = wrk.format("POST", path, headers, body)
  end
  idx = 0
end

function request()
  idx = idx % #reqs + 1
  return reqs[idx]
end
