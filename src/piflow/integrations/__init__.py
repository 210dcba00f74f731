"""Optional integrations (diffusers, …), imported lazily."""
