local hs = pending_or_invalid(obj)
if hs ~= nil then return hs end
local s = obj.status
local phase = s.phase
if phase == "Healthy" then
  return {status = "Healthy", message = "serving " .. (s.stableVersion or "")}
elseif phase == "Progressing" then
  return {status = "Progressing", message = (s.canaryVersion or "") .. " at " .. tostring(s.canaryWeight or 0) .. "%, step " .. (s.stepSummary or "")}
elseif phase == "Paused" then
  return {status = "Suspended", message = s.pauseReason or "paused"}
elseif phase == "Degraded" then
  return {status = "Degraded", message = s.abortReason or "aborted"}
end
return {status = "Progressing", message = s.pauseReason or "no version served yet"}
