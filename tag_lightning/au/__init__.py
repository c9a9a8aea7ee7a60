"""Action Unit grounding: landmarks, AU regions, AU intensities, quality and the AU cache."""
