-- Argo CD health of a MultimodalGraph (mmgraph.io/v1alpha1), read from the status the mmgraph operator writes.
-- Install: resource.customizations.health.mmgraph.io_MultimodalGraph in argocd-cm (README, "GitOps").
-- Lua 5.1, as Argo CD runs it; tests/test_argocd_health.py runs it against statuses the operator wrote.
local hs = {status = "Progressing", message = "waiting for the mmgraph operator to report a status"}
if obj.status == nil then
  return hs
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "waiting for the mmgraph operator to apply generation " .. tostring(generation)
  return hs
end
local conditions = {}
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    conditions[condition.type] = condition
  end
end
local degraded = conditions["Degraded"]
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = degraded.message or degraded.reason or "the operator reports the graph Degraded"
  return hs
end
local ready = conditions["Ready"]
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "every stage is rolled out and ready"
  return hs
end
if ready ~= nil and ready.message ~= nil then
  hs.message = ready.message
end
return hs
