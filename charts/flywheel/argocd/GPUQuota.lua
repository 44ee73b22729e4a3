local hs = pending_or_invalid(obj)
if hs ~= nil then return hs end
local ready = condition(obj, "Ready")
if ready ~= nil and ready.status == "True" then
  return {status = "Healthy", message = ready.message}
end
return {status = "Progressing", message = ready ~= nil and ready.message or "not ready yet"}
