-- Argo CD health for temper.dev/PostTrainingRun. Reads the same conditions kstatus (Flux)
-- reads, so both tools agree: Stalled/Failed -> Degraded, Reconciling -> Progressing.
-- A one-shot run behaves like a Job (Progressing until Succeeded); a continual run behaves
-- like a CronJob (Healthy while Ready, even while a cycle trains).
-- Lua 5.1 only: Argo CD runs gopher-lua.
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
  hs.message = "Waiting for the operator to report status"
  return hs
end

-- Conditions describe an older spec until the operator has observed the current one.
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local conditions = status.conditions
local failed = find(conditions, "Failed")
if is_true(failed) then
  hs.status = "Degraded"
  hs.message = describe(failed, "Run failed")
  return hs
end
local stalled = find(conditions, "Stalled")
if is_true(stalled) then
  hs.status = "Degraded"
  hs.message = describe(stalled, "Run is stalled")
  return hs
end

local suspended = find(conditions, "Suspended")
if is_true(suspended) then
  hs.status = "Suspended"
  hs.message = describe(suspended, "Run is suspended")
  return hs
end

local ready = find(conditions, "Ready")
local continual = obj.spec ~= nil and obj.spec.continual ~= nil
if continual and is_true(ready) then
  hs.status = "Healthy"
  hs.message = describe(ready, "Continual run is scheduled")
  return hs
end

local succeeded = find(conditions, "Succeeded")
if is_true(succeeded) then
  hs.status = "Healthy"
  hs.message = describe(succeeded, "Run succeeded")
  return hs
end

local reconciling = find(conditions, "Reconciling")
if is_true(reconciling) then
  hs.status = "Progressing"
  hs.message = describe(reconciling, "Run is in progress")
  return hs
end

if is_true(ready) then
  hs.status = "Healthy"
  hs.message = describe(ready, "Run is ready")
  return hs
end

hs.status = "Progressing"
hs.message = describe(succeeded, "Run is in progress")
return hs
