-- Argo CD health for temper.dev/Adapter. An Adapter is Healthy once its artifact is verified
-- (Ready=True), Progressing while the operator verifies or merges it (Reconciling=True) and
-- Degraded when verification or a merge failed (Stalled/Failed=True, or Ready=False with no
-- work in progress). A retired adapter is Healthy: retirement is a decision, not a fault.
-- Adapters cannot be suspended. Lua 5.1 only: Argo CD runs gopher-lua.
local hs = {}

local function find(conditions, kind)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function describe(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to verify the artifact"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local conditions = status.conditions
for _, kind in ipairs({"Failed", "Stalled"}) do
  local c = find(conditions, kind)
  if is_true(c) then
    hs.status = "Degraded"
    hs.message = describe(c, "Adapter is " .. string.lower(kind))
    return hs
  end
end

local ready = find(conditions, "Ready")
local retired = obj.spec ~= nil and obj.spec.lifecycle == "retired"
if is_true(ready) then
  hs.status = "Healthy"
  if retired then
    hs.message = "Retired: " .. describe(ready, "artifact verified")
  else
    hs.message = describe(ready, "Artifact verified")
  end
  return hs
end
if retired then
  hs.status = "Healthy"
  hs.message = "Retired: " .. describe(ready, "not servable")
  return hs
end

local reconciling = find(conditions, "Reconciling")
if is_true(reconciling) then
  hs.status = "Progressing"
  hs.message = describe(reconciling, "Verifying the artifact")
  return hs
end

if ready ~= nil then
  hs.status = "Degraded"
  hs.message = describe(ready, "Adapter is not ready")
  return hs
end

hs.status = "Progressing"
hs.message = "Waiting for the operator to verify the artifact"
return hs
