local hs = pending_or_invalid(obj)
if hs ~= nil then return hs end
local s = obj.status
local phase = s.phase
if phase == "Succeeded" then
  return {status = "Healthy", message = "produced ModelVersion " .. (s.modelVersion or "")}
elseif phase == "Failed" then
  local failed = condition(obj, "Failed")
  return {status = "Degraded", message = failed ~= nil and failed.message or "failed"}
elseif phase == "Suspended" then
  return {status = "Suspended", message = "spec.suspend is true"}
elseif phase == "Queued" then
  local reason = "waiting for admission"
  if s.queue ~= nil and s.queue.reason ~= nil then reason = s.queue.reason end
  return {status = "Progressing", message = "queued: " .. reason}
end
return {status = "Progressing", message = phase or "starting"}
