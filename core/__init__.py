"""UI-free plumbing shared by the trainers and the preprocessor."""
