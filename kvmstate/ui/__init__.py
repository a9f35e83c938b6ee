"""Terminal output shared by the CLI and the lab: the rich console, and hanging layout."""
