"""The `mpifed` command: parsing, reporting, and failure handling."""
