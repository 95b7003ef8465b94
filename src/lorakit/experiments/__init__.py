"""Paper reproductions dispatched by ``lorakit reproduce NAME`` (one module per experiment)."""
