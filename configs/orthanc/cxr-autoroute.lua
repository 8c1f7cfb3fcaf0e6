-- cxr-pipeline auto-routing for Orthanc (Lua, OnStoredInstance).
--
-- Every chest radiograph stored in Orthanc (Modality CR or DX) is sent by C-STORE to the
-- cxr-pipeline listener; its results (a TID 1500 SR and a heatmap Secondary Capture) come
-- back into the same study. Objects are NOT routed when they are:
--   * not CR/DX (CT, MR, SR, presentation states, ...),
--   * Structured Reports or any non-image SOP class,
--   * sent to Orthanc by the pipeline itself (calling AE = the pipeline's AE title),
--   * in one of the pipeline's result series (series number 9901/9902 by default),
--   * written by the pipeline (Manufacturer = "cxr-pipeline").
-- The body part is not checked here: the pipeline applies its own chest policy and records
-- why it skipped an image.
--
-- Options, all optional, in orthanc.json under "CxrPipeline":
--   "Modality"          name of the DicomModalities entry of the listener (default "cxr")
--   "ResultAet"         AE title the pipeline sends results with (default "CXR_PIPELINE")
--   "ResultSeries"      result series numbers (default [9901, 9902])
--   "Manufacturer"      Manufacturer written in result objects (default "cxr-pipeline")
--   "Modalities"        modalities routed (default ["CR", "DX"])

local options = {
  Modality = "cxr",
  ResultAet = "CXR_PIPELINE",
  ResultSeries = { 9901, 9902 },
  Manufacturer = "cxr-pipeline",
  Modalities = { "CR", "DX" },
}

-- SOP classes that are never images to analyse (SR family prefix, KOS, presentation state).
local NON_IMAGE_PREFIXES = {
  "1.2.840.10008.5.1.4.1.1.88.",   -- Structured Report storage classes
  "1.2.840.10008.5.1.4.1.1.11.",   -- Presentation states
  "1.2.840.10008.5.1.4.1.1.104.",  -- Encapsulated documents
}

do
  local ok, config = pcall(GetOrthancConfiguration)
  if ok and type(config) == "table" and type(config["CxrPipeline"]) == "table" then
    for key, value in pairs(config["CxrPipeline"]) do
      options[key] = value
    end
  end
end

local function trim(value)
  if value == nil then
    return ""
  end
  return (tostring(value):gsub("^%s+", ""):gsub("%s+$", ""))
end

local function contains(list, value)
  for _, item in ipairs(list) do
    if tostring(item) == value then
      return true
    end
  end
  return false
end

local function starts_with_any(value, prefixes)
  for _, prefix in ipairs(prefixes) do
    if value:sub(1, #prefix) == prefix then
      return true
    end
  end
  return false
end

-- Returns nil when the instance must be routed, else the reason it is not.
local function skip_reason(tags, metadata, origin)
  local modality = trim(tags["Modality"]):upper()
  if not contains(options.Modalities, modality) then
    return "modality " .. modality
  end
  local sop_class = trim(tags["SOPClassUID"])
  if starts_with_any(sop_class, NON_IMAGE_PREFIXES) then
    return "non-image SOP class " .. sop_class
  end
  local remote_aet = ""
  if type(origin) == "table" and origin["RemoteAet"] ~= nil then
    remote_aet = trim(origin["RemoteAet"])
  elseif type(metadata) == "table" and metadata["RemoteAET"] ~= nil then
    remote_aet = trim(metadata["RemoteAET"])
  end
  if remote_aet ~= "" and remote_aet == options.ResultAet then
    return "sent by the pipeline"
  end
  if contains(options.ResultSeries, trim(tags["SeriesNumber"])) then
    return "result series"
  end
  if trim(tags["Manufacturer"]) == options.Manufacturer then
    return "written by the pipeline"
  end
  return nil
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  local reason = skip_reason(tags, metadata, origin)
  if reason ~= nil then
    print("cxr-autoroute: not routing " .. instanceId .. " (" .. reason .. ")")
    return
  end
  print("cxr-autoroute: sending " .. instanceId .. " to " .. options.Modality)
  -- Synchronous C-STORE; a failure is logged by Orthanc and the instance stays stored, so
  -- it can be re-sent from the Orthanc UI or REST API (/modalities/<name>/store).
  SendToModality(instanceId, options.Modality)
end
