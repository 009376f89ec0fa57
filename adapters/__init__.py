"""Engine adapters: translate engine events into slot admissions, token feeds and ``apply`` calls."""
