-- Argo CD health check for volmig.io/VolumeMigration.
--
-- Install it in argocd-cm (see docs/ARCHITECTURE.md, "Argo CD"):
--   resource.customizations.health.volmig.io_VolumeMigration: |
--     <this file>
--
-- Healthy: the migration completed (condition Complete=True): the
--   workload runs on the target.
-- Degraded: it failed or was aborted (condition Failed=True): the
--   workload runs on a complete device, the message says which and why.
-- Progressing: everything else: no status yet, a status older than the
--   spec, waiting in Pending (the message names what it waits for:
--   VolumeNotServed, WaitingForTarget, ...), or a session running.
--
-- Written for Argo CD's Lua (5.1); tested with lua5.4 over the statuses the
-- operator writes (operator/tests/argocd_health.rs).

local hs = {}

local function condition(t)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == t then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the volmig operator to pick the migration up"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the volmig operator to see the latest spec"
  return hs
end

local phase = obj.status.phase or "Pending"
local complete = condition("Complete")
local failed = condition("Failed")

if is_true(complete) or (complete == nil and phase == "Completed") then
  hs.status = "Healthy"
  local ready = condition("Ready")
  if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
    hs.message = ready.message
  else
    hs.message = "Completed: the workload runs on the target"
  end
  return hs
end

if is_true(failed) or (failed == nil and (phase == "Failed" or phase == "Aborted")) then
  hs.status = "Degraded"
  if failed ~= nil and failed.message ~= nil and failed.message ~= "" then
    hs.message = phase .. ": " .. failed.message
  elseif obj.status.error ~= nil then
    hs.message = phase .. ": " .. obj.status.error
  else
    hs.message = phase
  end
  return hs
end

hs.status = "Progressing"
local progressing = condition("Progressing")
if phase == "Pending" and progressing ~= nil then
  hs.message = "Pending: " .. (progressing.reason or "") .. ": " .. (progressing.message or "")
elseif obj.status.progress ~= nil then
  hs.message = phase .. ": " .. obj.status.progress .. " copied"
else
  hs.message = phase
end
return hs
