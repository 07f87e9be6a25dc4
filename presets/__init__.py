"""The shipped presets: one YAML file per system (schema: services.common.presets.Preset)."""
