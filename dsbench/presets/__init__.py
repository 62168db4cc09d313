"""The shipped sweep specs, one TOML file each (`dsbench presets` lists them)."""

# Presets renamed so their names say which model size they hold: old name -> new name. An old
# name is refused in one line naming the new one (no silent alias: gpu-medium held the large size).
RENAMED = {"gpu-small": "medium-gpu", "gpu-medium": "large-gpu"}
