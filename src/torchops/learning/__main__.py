"""``python -m torchops.learning MODEL...``: the learner process ``serve --learn`` starts."""

from __future__ import annotations

from torchops.learning.process import main

if __name__ == "__main__":
    main()
