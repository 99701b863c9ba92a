"""``python -m text2llm`` == the ``text2llm`` command (so ``torchrun -m text2llm train ...`` works)."""

from text2llm.cli import entry

if __name__ == "__main__":
    entry()
