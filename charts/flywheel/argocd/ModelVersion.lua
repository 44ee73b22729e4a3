local hs = pending_or_invalid(obj)
if hs ~= nil then return hs end
local validated = condition(obj, "Validated")
local message = validated ~= nil and validated.message or ""
if obj.status.phase == "Validated" then
  return {status = "Healthy", message = message}
elseif obj.status.phase == "Rejected" then
  return {status = "Degraded", message = message}
end
return {status = "Progressing", message = message}
