-- Shared by every Flywheel health check (prepended to each kind's script when installed into argocd-cm).
local function condition(obj, type_)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

-- Not yet seen by the operator, or a spec it refused: the same answer for every kind.
local function pending_or_invalid(obj)
  local invalid = condition(obj, "InvalidSpec")
  if invalid ~= nil and invalid.status == "True" then
    return {status = "Degraded", message = invalid.message}
  end
  if obj.status == nil or obj.status.observedGeneration == nil
      or (obj.metadata.generation ~= nil and obj.status.observedGeneration < obj.metadata.generation) then
    return {status = "Progressing", message = "waiting for the Flywheel operator"}
  end
  return nil
end
