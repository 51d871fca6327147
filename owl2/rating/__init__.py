"""Rating images and videos with the Q-Align family of mPLUG-Owl2 scorers (Q-Align / OneAlign, DeQA-Score).

``pipe.rate(items)`` (:meth:`owl2.api.Pipeline.rate`) is the entry point; :mod:`owl2.rating.scale` holds the recipe
(level words, weights, prompts, the read-out) and :mod:`owl2.rating.rate` the batching of items into prefills.
"""

from owl2.rating.rate import RatingRow, Video, rate, rating_row, video_frames
from owl2.rating.scale import LEVELS, PROMPTS, TASKS, Rating, RatingScale, level_token_id, render_rating_prompt

__all__ = [
    "LEVELS",
    "PROMPTS",
    "TASKS",
    "Rating",
    "RatingRow",
    "RatingScale",
    "Video",
    "level_token_id",
    "rate",
    "rating_row",
    "render_rating_prompt",
    "video_frames",
]
