"""The benchmark's prompts: short, varied questions (chat-formatted they are 30-60 tokens)."""

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in one paragraph.",
    "Write a haiku about the sea.", "What is machine learning?", "Name three primary colors.",
    "How do airplanes fly?", "Give me a recipe for pancakes.", "What is Ray in Python?",
    "Summarize the plot of Hamlet.", "Why is the sky blue?", "List four planets.",
    "What does a CPU do?", "Tell me a fun fact about cats.", "How do vaccines work?",
    "What is the speed of light?", "Describe a rainbow.",
]
