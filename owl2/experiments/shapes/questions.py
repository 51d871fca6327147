"""The shapes world's questions, the training answer styles and the scorer.

Questions (:func:`scene_questions`) are correct by construction: each one is asked only when its answer follows
uniquely from the scene data (a unique referent, a clear spatial separation, ...). The types, each with a canonical
short answer, are in :data:`SCENE_QUESTION_TYPES`; text-only items (:func:`text_questions`) are in
:data:`TEXT_QUESTION_TYPES`. The training answer styles (:data:`ANSWER_STYLES`, :func:`restyled`) rewrite some
answers into forms a small model learns more easily; :func:`score_answer` normalises free-form model output before
comparing, and reads every style's answer as the short one.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from owl2.constants import IMAGE_PLACEHOLDER
from owl2.experiments.shapes.scenes import (
    BACKGROUNDS,
    COLOURS,
    PLURALS,
    SHAPES,
    SIZE_EXTENT,
    SIZES,
    Scene,
    ShapeObject,
    _as_rng,
    generate_scene,
    stream_rng,
)
from owl2.processing.conversation import (
    CAPTION_INSTRUCTION,
    MULTIPLE_CHOICE_INSTRUCTION_ASCII,
    VQA_INSTRUCTION,
    multiple_choice_prompt,
    vqa_prompt,
)

SCENE_QUESTION_TYPES: tuple[str, ...] = (
    "existence", "colour", "count", "position", "shape", "caption", "multiple_choice",
)
TEXT_QUESTION_TYPES: tuple[str, ...] = ("arithmetic", "spelling", "alphabetical", "letter_count", "reversal")
QUESTION_TYPES: tuple[str, ...] = SCENE_QUESTION_TYPES + TEXT_QUESTION_TYPES

# The instructions are LLaVA-1.5's / mPLUG-Owl2's (owl2.processing.conversation holds them), so a released model
# answers in the right form; the multiple-choice one is LLaVA-1.5's ASCII spelling, which owl2-tiny was trained on.
SHORT_ANSWER_PROMPT = VQA_INSTRUCTION
MC_PROMPT = MULTIPLE_CHOICE_INSTRUCTION_ASCII
CAPTION_PROMPT = CAPTION_INSTRUCTION
MC_LETTERS = "ABCD"

SIDES: tuple[str, ...] = ("left", "right", "top", "bottom")
SIDE_OPTIONS = tuple(f"{SIDES[2 * axis]} or {SIDES[2 * axis + 1]}" for axis in (0, 1))
"""How a side question offers its answers, per axis: ``"left or right"``, ``"top or bottom"``."""
SIDE_MARGIN = 0.02
"""An object is on a side only when its whole box is at least this far past the image's midline."""
RELATION_MARGIN = 0.02
""""A is left of B" is asked only when A's box ends at least this far before B's begins (no borderline cases)."""

WORDS: tuple[str, ...] = (
    "apple", "anchor", "banana", "basket", "bird", "book", "bread", "button", "cactus", "candle", "cat", "chair",
    "cloud", "dog", "dragon", "eagle", "engine", "feather", "fish", "forest", "garden", "grape", "guitar", "hammer",
    "horse", "house", "igloo", "island", "jacket", "jungle", "kettle", "koala", "ladder", "lemon", "light", "lizard",
    "magnet", "milk", "moon", "mouse", "music", "needle", "night", "orbit", "paper", "pencil", "pepper", "piano",
    "quilt", "river", "robot", "rocket", "ship", "stone", "summer", "sun", "table", "tiger", "train", "tree",
    "violin", "wagon", "water", "window", "winter", "yogurt", "zebra",
)
"""Plain lowercase words for the text-only items (distinct, letters only)."""

@dataclass
class QAItem:
    """One question with its canonical answer.

    ``question`` is the full text posed to the model (instruction suffix and, for multiple choice, the lettered
    options included; no image placeholder). ``choices``: the option texts of a multiple-choice item, in letter order.
    ``image``: the image path (relative to the data file) or ``None`` for text-only items.
    """

    id: str
    type: str
    question: str
    answer: str
    choices: list[str] | None = None
    image: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "image": self.image, "type": self.type, "question": self.question,
                                "answer": self.answer}
        if self.choices is not None:
            data["choices"] = list(self.choices)
        return data


# ------------------------------------------------------------------------------------------------------- questions
# Referring expressions, shortest first: an object is named by the first attribute set that singles it out.
_REFERENCES: tuple[tuple[str, ...], ...] = (("shape",), ("colour", "shape"), ("size", "shape"),
                                            ("size", "colour", "shape"))


def _refer(obj: ShapeObject, scene: Scene, orders: Sequence[tuple[str, ...]] = _REFERENCES) -> str | None:
    """``"red circle"``-style phrase naming ``obj`` uniquely in ``scene`` (attributes in size-colour-shape order)."""
    for attrs in orders:
        matches = [o for o in scene.objects if all(getattr(o, a) == getattr(obj, a) for a in attrs)]
        if len(matches) == 1:
            return " ".join(getattr(obj, a) for a in attrs)
    return None


def object_phrases() -> list[str]:
    """Every way the questions and captions name one object by colour and shape: ``"red circle"`` and ``"small red
    circle"`` for every size, colour and shape (owl2-tiny's tokenizer can give each its own piece)."""
    named = (*_product([tuple(COLOURS), SHAPES]), *_product([SIZES, tuple(COLOURS), SHAPES]))
    return [" ".join(words) for words in named]


def _short(question: str) -> str:
    return vqa_prompt(question, separator="\n")


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _left_to_right(scene: Scene) -> list[ShapeObject]:
    """The objects in the order captions (and listed answers) name them."""
    return sorted(scene.objects, key=lambda o: (o.x, o.y))


def caption(scene: Scene) -> str:
    """The canonical caption: every object (size colour shape), left to right, then the background.

    ``"A large red circle, a small blue square and a small green triangle on a grey background."``
    """
    phrases = [_article(o.description) for o in _left_to_right(scene)]
    listing = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    text = f"{listing} on {_article(scene.background)} background."
    return text[0].upper() + text[1:]


def _existence(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """One "yes" and one "no" question per scene, so the type is exactly balanced over any set of scenes.

    The "no" object is a near miss (shares the colour or the shape with something present) when possible, so the
    question cannot be answered from colour or shape alone. A quarter of the scenes also name the size.
    """
    with_size = rng.random() < 0.25
    keys = ("size", "colour", "shape") if with_size else ("colour", "shape")
    present = {tuple(getattr(o, k) for k in keys) for o in scene.objects}
    yes = rng.choice(sorted(present))
    values = {"size": SIZES, "colour": tuple(COLOURS), "shape": SHAPES}
    absent = [c for c in _product([values[k] for k in keys]) if c not in present]
    near = [c for c in absent if any(sum(a == b for a, b in zip(c, p, strict=True)) == len(keys) - 1
                                     for p in present)]
    no = rng.choice(near if near else absent)
    pairs = [(f"Is there {_article(' '.join(yes))}?", "yes"), (f"Is there {_article(' '.join(no))}?", "no")]
    rng.shuffle(pairs)
    return [(_short(q), a) for q, a in pairs]


def _product(groups: Sequence[Sequence[str]]) -> list[tuple[str, ...]]:
    result: list[tuple[str, ...]] = [()]
    for group in groups:
        result = [(*r, g) for r in result for g in group]
    return result


def _colour_question(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """"What colour is the square?" for an object named without its colour (so the answer is unique)."""
    candidates = [(o, ref) for o in scene.objects if (ref := _refer(o, scene, (("shape",), ("size", "shape"))))]
    if not candidates:
        return []
    obj, ref = rng.choice(candidates)
    return [(_short(f"What colour is the {ref}?"), obj.colour)]


def _shape_question(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """"What shape is the green object?" for an object named without its shape."""
    candidates = [(o, ref) for o in scene.objects if (ref := _refer(o, scene, (("colour",), ("size", "colour"))))]
    if not candidates:
        return []
    obj, ref = rng.choice(candidates)
    return [(_short(f"What shape is the {ref} object?"), obj.shape)]


_TOTAL_COUNT = "How many shapes are there?"


def _count_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """The total count and the count of one shape or one colour (now and then one that is absent: "0").

    The counted value is that of a random object, so values present several times are picked more often (uniform
    over values, most answers would be "1"); shapes repeat more than colours, so they are counted more often.
    """
    items = [(_short(_TOTAL_COUNT), str(len(scene.objects)))]
    by_shape = rng.random() < 0.7
    key, vocabulary = ("shape", SHAPES) if by_shape else ("colour", tuple(COLOURS))
    absent = [v for v in vocabulary if all(getattr(o, key) != v for o in scene.objects)]
    value = rng.choice(absent) if absent and rng.random() < 0.15 else getattr(rng.choice(scene.objects), key)
    number = sum(getattr(o, key) == value for o in scene.objects)
    noun = PLURALS[value] if by_shape else f"{value} shapes"
    items.append((_short(f"How many {noun} are there?"), str(number)))
    return items


_RELATIONS = {  # word -> (axis, sign): "a is left of b" means a's box ends before b's begins on x.
    "to the left of": (0, 1), "to the right of": (0, -1), "above": (1, 1), "below": (1, -1),
}


def _separated(a: ShapeObject, b: ShapeObject, axis: int) -> int:
    """+1 when ``a``'s box lies wholly before ``b``'s on ``axis``, -1 when wholly after, 0 when too close to tell."""
    a0, a1 = a.bbox[axis], a.bbox[axis + 2]
    b0, b1 = b.bbox[axis], b.bbox[axis + 2]
    return 1 if a1 + RELATION_MARGIN <= b0 else -1 if b1 + RELATION_MARGIN <= a0 else 0


def side_of(obj: ShapeObject, axis: int) -> str | None:
    """``"left"``/``"right"`` (axis 0) or ``"top"``/``"bottom"`` (axis 1) when the whole box is in that half."""
    low, high = obj.bbox[axis], obj.bbox[axis + 2]
    if high <= 0.5 - SIDE_MARGIN:
        return SIDES[2 * axis]
    if low >= 0.5 + SIDE_MARGIN:
        return SIDES[2 * axis + 1]
    return None


def _position_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """A pairwise relation (yes/no; only for boxes clearly separated on that axis) and a side question."""
    items: list[tuple[str, str]] = []
    refs = [(o, ref) for o in scene.objects if (ref := _refer(o, scene))]
    pairs = [(a, b, axis) for i, a in enumerate(refs) for j, b in enumerate(refs) if i != j
             for axis in (0, 1) if _separated(a[0], b[0], axis)]
    if pairs:
        (a, a_ref), (b, b_ref), axis = rng.choice(pairs)
        # Either word of the axis: the answer is then "yes" or "no" about equally often.
        word = rng.choice([w for w, (ax, _) in _RELATIONS.items() if ax == axis])
        answer = "yes" if _separated(a, b, axis) == _RELATIONS[word][1] else "no"
        items.append((_short(f"Is the {a_ref} {word} the {b_ref}?"), answer))
    sided = [(o, ref, axis, side) for o, ref in refs for axis in (0, 1) if (side := side_of(o, axis))]
    if sided:
        _, ref, axis, _side = rng.choice(sided)
        items.append((_short(f"Which side of the image is the {ref} on, {SIDE_OPTIONS[axis]}?"), _side))
    return items


def _multiple_choice(scene: Scene, rng: random.Random) -> tuple[str, str, list[str]] | None:
    """A shape, colour or total-count question with the answer and 3 distractors, shuffled, lettered A-D."""
    kinds: list[tuple[str, str, Sequence[str]]] = []
    shape_refs = [(o, r) for o in scene.objects if (r := _refer(o, scene, (("colour",), ("size", "colour"))))]
    if shape_refs:
        obj, ref = rng.choice(shape_refs)
        kinds.append((f"What shape is the {ref} object?", obj.shape, SHAPES))
    colour_refs = [(o, r) for o in scene.objects if (r := _refer(o, scene, (("shape",), ("size", "shape"))))]
    if colour_refs:
        obj, ref = rng.choice(colour_refs)
        kinds.append((f"What colour is the {ref}?", obj.colour, tuple(COLOURS)))
    kinds.append((_TOTAL_COUNT, str(len(scene.objects)), tuple(str(n) for n in range(1, 7))))
    question, answer, vocabulary = rng.choice(kinds)
    choices = [answer, *rng.sample([v for v in vocabulary if v != answer], 3)]
    rng.shuffle(choices)
    text = multiple_choice_prompt(question, dict(zip(MC_LETTERS, choices, strict=True)), instruction=MC_PROMPT)
    return text, MC_LETTERS[choices.index(answer)], choices


def scene_questions(scene: Scene, rng: random.Random | int | str, *, image: str | None = None) -> list[QAItem]:
    """Every applicable question about ``scene``, in :data:`SCENE_QUESTION_TYPES` order.

    Per scene: 2 ``existence`` (one yes, one no), 1 ``colour`` and 1 ``shape`` (when some object can be named
    without the asked attribute), 2 ``count`` (total; one shape or colour), up to 2 ``position`` (a relation and a
    side, each only when unambiguous), 1 ``caption`` and 1 ``multiple_choice``. Ids are
    ``f"{scene.id}-{type}-{k}"``; ``image`` is stored on each item.
    """
    rng = _as_rng(rng)
    generated: list[tuple[str, list[tuple[str, str]]]] = [
        ("existence", _existence(scene, rng)),
        ("colour", _colour_question(scene, rng)),
        ("count", _count_questions(scene, rng)),
        ("position", _position_questions(scene, rng)),
        ("shape", _shape_question(scene, rng)),
        ("caption", [(CAPTION_PROMPT, caption(scene))]),
    ]
    items = [QAItem(f"{scene.id}-{kind}-{k}", kind, q, a, image=image)
             for kind, pairs in generated for k, (q, a) in enumerate(pairs)]
    mc = _multiple_choice(scene, rng)
    if mc is not None:
        question, answer, choices = mc
        items.append(QAItem(f"{scene.id}-multiple_choice-0", "multiple_choice", question, answer, choices, image))
    return items


def binding_drills(scene: Scene, rng: random.Random | int | str) -> list[QAItem]:
    """Training-only questions that exercise attribute binding on every object, not one per scene.

    :func:`scene_questions` asks one colour and one shape question per scene and its existence questions are near
    misses, which a small model trained from scratch does not learn to answer (``docs/experiments.md``): the answer
    is an equality between a retrieved and an asked attribute, with no first-order gradient. These drills give the
    same skills main effects: the colour and the shape of every object that can be named without them, the side of
    every object that lies in one half, and existence asked about one attribute ("Is there a purple object?",
    "Is there a triangle?", a yes and a no each where some value is absent) as well as about an absent colour-shape
    pair that shares nothing with the "yes" object. Types are those of the scored questions; ids are
    ``f"{scene.id}-drill-{k}"``.
    """
    rng = _as_rng(rng)
    pairs: list[tuple[str, str, str]] = []
    for obj in scene.objects:
        if ref := _refer(obj, scene, (("shape",), ("size", "shape"))):
            pairs.append(("colour", f"What colour is the {ref}?", obj.colour))
        if ref := _refer(obj, scene, (("colour",), ("size", "colour"))):
            pairs.append(("shape", f"What shape is the {ref} object?", obj.shape))
        if ref := _refer(obj, scene):
            for axis, options in enumerate(SIDE_OPTIONS):
                if side := side_of(obj, axis):
                    pairs.append(("position", f"Which side of the image is the {ref} on, {options}?", side))
    for key, values, phrase in (("colour", tuple(COLOURS), "{} object"), ("shape", SHAPES, "{}")):
        present = sorted({getattr(o, key) for o in scene.objects})
        absent = [v for v in values if v not in present]
        if absent:
            for value, answer in ((rng.choice(present), "yes"), (rng.choice(absent), "no")):
                pairs.append(("existence", f"Is there {_article(phrase.format(value))}?", answer))
    yes = rng.choice(scene.objects)
    far = [(c, s) for c in COLOURS for s in SHAPES
           if c != yes.colour and s != yes.shape and all((o.colour, o.shape) != (c, s) for o in scene.objects)]
    colour, shape = rng.choice(far)
    pairs += [("existence", f"Is there {_article(f'{yes.colour} {yes.shape}')}?", "yes"),
              ("existence", f"Is there {_article(f'{colour} {shape}')}?", "no")]
    rng.shuffle(pairs)
    return [QAItem(f"{scene.id}-drill-{k}", kind, _short(q), a) for k, (kind, q, a) in enumerate(pairs)]


def counted_existence_answer(scene: Scene, question: str) -> str:
    """The answer to an existence question with the count it rests on: ``"0 red triangles, so no."``,
    ``"1 large circle, so yes."``, ``"2 purple objects, so yes."``.

    A training-time form of the yes/no answer: the count comes first, so the model learns existence through counting
    (which it learns) and the yes/no word then follows from the number alone. :func:`score_answer` reads the yes/no
    word, so such an answer scores as the plain one does.
    """
    words, wanted = _asked_existence(question)
    number = sum(_matches(o, wanted) for o in scene.objects)
    if number != 1:
        words[-1] = PLURALS.get(words[-1], words[-1] + "s")
    return f"{number} {' '.join(words)}{_SO}{'yes' if number else 'no'}."


def listed_answer(scene: Scene, question: str, *, marked: bool = False) -> str:
    """The answer to a question that names an object, after the objects present, left to right.

    ``"Is there a red square?"`` -> ``"red circle, blue cross, so no."`` (every distinct object named by the asked
    attributes); ``"What colour is the cross?"`` -> ``"red circle, blue cross, so blue."`` and ``"What shape is the
    blue object?"`` -> ``"red circle, blue cross, so cross."`` (every distinct object by colour and shape, with its
    size when the question names one); ``"How many circles are there?"`` -> ``"circle, cross, circle, so 2."`` (every
    object named by the asked attribute). A training-time form of the answer: what comes first is what the image
    alone predicts (as a caption is), and each listed word comes after the question, so finding the asked object is
    a lookup between two text positions, not a lookup in the image keyed by the question. :func:`score_answer`
    reads what follows the last ", so ", so such an answer scores as the short one does. Other questions (the total
    count included) raise ``ValueError``.

    ``marked`` follows every listed object that the question names with the running count of such objects:
    ``"red circle, red square 1, so yes."``, ``"red circle, blue cross 1, so blue."``, ``"circle 1, cross, circle 2,
    so 2."``. Each mark is a decision about the object just written and the words of the question, and the
    conclusion follows from the marks alone. Trained on text with the list in the question, a small language model
    learns these marks where it does not learn the conclusion from the bare list; in answers about an image it has
    not learned them yet (``docs/experiments.md``).
    """
    first = question.split("\n")[0]
    ordered = _left_to_right(scene)
    if counted := _counted(question):
        key, value = counted
        entries = [(getattr(o, key), getattr(o, key) == value) for o in ordered]
        answer = str(sum(hit for _, hit in entries))
    else:
        if match := re.fullmatch(r"What (colour|shape) is the ((?:(?:small|large) )?\w+)(?: object)?\?", first):
            asked, wanted = match.group(1), _attributes(match.group(2).split())
            keys = ("size", "colour", "shape") if "size" in wanted else ("colour", "shape")
            answer = getattr(_the_object(scene, match.group(2), question), asked)
        else:
            _, wanted = _asked_existence(question)
            keys = tuple(k for k in ("size", "colour", "shape") if k in wanted)
            answer = "yes" if any(_matches(o, wanted) for o in scene.objects) else "no"
        named: dict[str, bool] = {}
        for o in ordered:
            name = " ".join(getattr(o, k) for k in keys)
            named[name] = named.get(name, False) or _matches(o, wanted)
        entries = list(named.items())
    parts, hits = [], 0
    for name, hit in entries:
        if hit and marked:
            hits += 1
            name = f"{name} {hits}"
        parts.append(name)
    return f"{', '.join(parts)}{_SO}{answer}."


def chained_answer(scene: Scene, question: str) -> str:
    """The answer to an existence question or a count of one shape or colour through a lookup of the asked objects.

    Existence goes through the colours of the asked shape: ``"Is there a red circle?"`` -> ``"circle blue no"`` (the
    colours of the circles present, left to right, then the answer; ``"circle none no"`` when there is no circle;
    the size too when the question names one: ``"small circle red yes"``). A count lists what it counts:
    ``"How many circles are there?"`` -> ``"circles red blue 2"`` (their colours), ``"How many red shapes are
    there?"`` -> ``"red shapes circle cross 2"`` (their shapes), ``"circles none 0"``.

    A training-time form of the answer: the first step is the lookup of a colour or shape question ("What colour
    is the circle?"), which a small model learns from the start, and the answer then only compares two words of
    its context or counts the words it has just written. Asked directly, "red circle no" stays at chance
    (``docs/experiments.md``): the colour and the shape of a near miss each match something present, so nothing
    simpler predicts the answer. :func:`score_answer` reads the answer word, so such an answer scores as the short
    one does.
    """
    first = question.split("\n")[0]
    ordered = _left_to_right(scene)
    if counted := _counted(question):
        key, value = counted
        other = "colour" if key == "shape" else "shape"
        listed = [getattr(o, other) for o in ordered if getattr(o, key) == value]
        return f"{first.split(' are there')[0].removeprefix('How many ')} {' '.join(listed) or 'none'} {len(listed)}"
    words, wanted = _asked_existence(question)
    colour = wanted.pop("colour", None)
    if colour is None:
        raise ValueError(f"not an existence question that names a colour: {question!r}")
    colours = [o.colour for o in ordered if _matches(o, wanted)]
    named = " ".join(w for w in words if w != colour)
    return f"{named} {' '.join(colours) or 'none'} {'yes' if colour in colours else 'no'}"


def chained_position_answer(scene: Scene, question: str, answer: str) -> str:
    """The answer to a position question after where the asked objects are.

    ``"Is the red triangle to the left of the circle?"`` -> ``"red triangle circle yes"``: the two objects in their
    order along the relation's axis (left to right; for "above" and "below", top to bottom), then the answer.
    ``"Which side of the image is the circle on, left or right?"`` -> ``"circle left"``. A training-time form: the
    order is the one the captions name the objects in (left to right), and the yes/no word then only compares it
    with the order of the question, a comparison of two words rather than of two numbers (``docs/experiments.md``).
    :func:`score_answer` reads the answer word, so such an answer scores as the short one does.
    """
    first = question.split("\n")[0]
    if match := re.fullmatch(rf"Which side of the image is the (.+) on, (?:{'|'.join(SIDE_OPTIONS)})\?", first):
        return f"{match.group(1)} {answer}"
    relations = "|".join(_RELATIONS)
    match = re.fullmatch(rf"Is the (.+) ({relations}) the (.+)\?", first)
    if match is None:
        raise ValueError(f"not a position question: {question!r}")
    axis = _RELATIONS[match.group(2)][0]
    placed = [(_the_object(scene, reference, question).centre[axis], reference)
              for reference in (match.group(1), match.group(3))]
    return f"{' '.join(reference for _, reference in sorted(placed))} {answer}"


VERTICAL_ORDER_PROMPT = "List the objects from top to bottom."


def vertical_order(scene: Scene, image: str | None = None) -> QAItem:
    """A training-only item: every object, top to bottom (``"large red circle, small blue cross"``).

    The captions name the objects left to right, which trains the horizontal coordinate; this trains the vertical
    one the same way (the captions alone do not teach top from bottom, ``docs/experiments.md``).
    Its type, ``"vertical_order"``, is none of the scored question types.
    """
    ordered = sorted(scene.objects, key=lambda o: (o.y, o.x))
    return QAItem(f"{scene.id}-vertical_order-0", "vertical_order", VERTICAL_ORDER_PROMPT,
                  ", ".join(o.description for o in ordered), image=image)


def restated_answer(question: str, answer: str) -> str:
    """The short ``answer`` after the object the question asks about: ``"Is there a red circle?"`` -> ``"red circle
    no"``, ``"What colour is the triangle?"`` -> ``"triangle white"``, ``"What shape is the orange object?"`` ->
    ``"orange cross"``, ``"How many circles are there?"`` -> ``"circles 2"``.

    A training-time form of the answer: the answer word is predicted right after the asked object's words, so one
    attention step from them into the image finds it: at a large batch, a small language model learns existence
    from it, which it does not from the bare word (``docs/experiments.md``). :func:`score_answer` reads the answer
    word among the restated ones, so such an answer scores as the short one does. Other questions (the total count
    included) raise ``ValueError``.
    """
    first = question.split("\n")[0]
    for pattern in (r"Is there an? (.+)\?", r"What colour is the (.+)\?", r"What shape is the (.+) object\?",
                    r"How many (.+) are there\?"):
        if (match := re.fullmatch(pattern, first)) and match.group(1) != "shapes":
            return f"{match.group(1)} {answer}"
    raise ValueError(f"not a question about one named object: {question!r}")


def choice_answer(choices: Sequence[str], letter: str) -> str:
    """A multiple-choice answer as the option's text, then its letter: ``(["circle", "diamond"], "B")`` ->
    ``"diamond B"``.

    The training form of the focus set (:func:`write_focus_set`): the option is named first, as the restated answers
    name the asked object, so the letter is then a look-up in the question. :func:`score_answer` scores it by the
    option it names."""
    if letter not in MC_LETTERS[:len(choices)]:
        raise ValueError(f"no option {letter!r} among {len(choices)} choices")
    return f"{choices[MC_LETTERS.index(letter)]} {letter}"


def asked_shape_count(scene: Scene, question: str) -> int:
    """How many objects of ``scene`` have the shape (and the size) an existence question asks about, whatever their
    colour: the number of colours its :func:`chained_answer` lists. ``question`` may carry the image placeholder."""
    _, wanted = _asked_existence(question.removeprefix(IMAGE_PLACEHOLDER).lstrip("\n"))
    wanted.pop("colour", None)
    return sum(_matches(o, wanted) for o in scene.objects)


def _asked_existence(question: str) -> tuple[list[str], dict[str, str]]:
    """The words after "Is there a" and the attributes they ask for (``{"colour": "red", "shape": "circle"}``)."""
    match = re.fullmatch(r"Is there an? ((?:(?:small|large) )?(?:\w+ )?\w+)\?", question.split("\n")[0])
    if match is None:
        raise ValueError(f"not an existence question: {question!r}")
    words = match.group(1).split()
    return words, _attributes(words)


def _counted(question: str) -> tuple[str, str] | None:
    """What a count of one shape or colour counts (``"How many circles are there?"`` -> ``("shape", "circle")``,
    ``"How many red shapes are there?"`` -> ``("colour", "red")``); None for any other question."""
    match = re.fullmatch(r"How many (\w+)(?: shapes)? are there\?", question.split("\n")[0])
    if match is None:
        return None
    word = match.group(1)
    if word in _SINGULAR:
        return "shape", _SINGULAR[word]
    if word in COLOURS:
        return "colour", word
    raise ValueError(f"not a count of one shape or colour: {question!r}")


def _the_object(scene: Scene, reference: str, question: str) -> ShapeObject:
    """The one object of ``scene`` that ``reference`` (``"small red circle"``) names; ``ValueError`` otherwise."""
    found = [o for o in scene.objects if _matches(o, _attributes(reference.split()))]
    if len(found) != 1:
        raise ValueError(f"not a question about one object of this scene: {reference!r} does not name one object "
                         f"({len(found)} match): {question!r}")
    return found[0]


def _attributes(words: Sequence[str]) -> dict[str, str]:
    """The attribute each word names: ``["small", "red", "circle"]`` -> ``{"size": "small", "colour": "red", ...}``."""
    return {k: w for w in words for k, values in (("size", SIZES), ("colour", COLOURS), ("shape", SHAPES))
            if w in values}


def _matches(obj: ShapeObject, wanted: Mapping[str, str]) -> bool:
    return all(getattr(obj, k) == v for k, v in wanted.items())


ANSWER_STYLES = ("short", "restated", "chained", "counted", "listed", "marked")
"""The forms :func:`write_training_set` can give the training answers (``answer_style``)."""
ANSWER_EXAMPLES = {"short": "yes", "restated": "red circle yes", "chained": "circle red yes",
                   "counted": "1 red circle, so yes.",
                   "listed": "red circle, blue cross, so yes.", "marked": "red circle 1, blue cross, so yes."}
"""How each style answers "Is there a red circle?" about a red circle and a blue cross, left to right (the CLI's
help and the model card quote it: a model answers in the style it was trained on)."""
_SO = ", so "  # between a listed answer's list and its conclusion
LISTED_TYPES = ("existence", "colour", "shape", "count")
"""The question types whose answers ``answer_style="listed"`` rewrites (the total count keeps its short answer)."""


def list_questions(seed: int, n: int, *, marked: bool = True) -> list[QAItem]:
    """``n`` training-only text items that ask about a list of objects written in the question.

    ``"Objects: red circle, blue cross.\nIs there a blue cross?"`` -> ``"red circle, blue cross 1, so yes."``: the
    existence, colour, shape and named-count questions of a scene (drawn from the ``"train"`` stream, apart from the
    training scenes: ``index=f"list{k}"``). The question gives the list of the scene's :func:`listed_answer` (without
    marks), and the answer is that listed answer (``marked`` or not), which copies the list. Without an image the list
    is in the text, so these items train the step from a list to the answer on its own: matching a listed object with
    the words of the question. Types are those of the scene questions; ids are
    ``f"shapes-train-{seed}-list-{k:06d}"``.
    """
    items: list[QAItem] = []
    for k in range(n):
        scene = generate_scene(stream_rng("train", seed, f"list{k}", "scene"))
        rng = stream_rng("train", seed, f"list{k}", "questions")
        asked = [i for i in scene_questions(scene, rng)
                 if i.type in LISTED_TYPES and not i.question.startswith(_TOTAL_COUNT)]
        item = rng.choice(asked)
        listing = listed_answer(scene, item.question).rpartition(_SO)[0]
        question = f"Objects: {listing}.\n{item.question}"
        answer = listed_answer(scene, item.question, marked=marked)
        items.append(QAItem(f"shapes-train-{seed}-list-{k:06d}", item.type, question, answer))
    return items


# ------------------------------------------------------------------------------------------------------- text items
def _text_item(kind: str, rng: random.Random) -> tuple[str, str]:
    if kind == "arithmetic":
        op = rng.choice(("plus", "minus", "times"))
        if op == "times":
            a, b = rng.randint(0, 12), rng.randint(0, 12)
            return _short(f"What is {a} times {b}?"), str(a * b)
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if op == "minus":
            a, b = max(a, b), min(a, b)  # answers stay non-negative
            return _short(f"What is {a} minus {b}?"), str(a - b)
        return _short(f"What is {a} plus {b}?"), str(a + b)
    word = rng.choice(WORDS)
    if kind == "spelling":
        return f"Spell the word {word}, separating the letters with spaces.", " ".join(word)
    if kind == "letter_count":
        return _short(f"How many letters are in the word {word}?"), str(len(word))
    if kind == "reversal":
        return f"Write the word {word} backwards.", word[::-1]
    if kind == "alphabetical":
        words = rng.sample(WORDS, rng.randint(3, 4))
        return f"Sort these words alphabetically: {', '.join(words)}.", ", ".join(sorted(words))
    raise ValueError(f"unknown text question type {kind!r}")


def text_questions(rng: random.Random | int | str, n: int, *, prefix: str = "text") -> list[QAItem]:
    """``n`` text-only items (``image=None``), types drawn uniformly from :data:`TEXT_QUESTION_TYPES`.

    ``"What is 7 plus 5?"`` -> ``"12"``, ``"Spell the word cat, ..."`` -> ``"c a t"``, ``"Sort these words
    alphabetically: pear, apple, fig."`` -> ``"apple, fig, pear"``, ``"How many letters are in the word cat?"`` ->
    ``"3"``, ``"Write the word cat backwards."`` -> ``"tac"``. Ids are ``f"{prefix}-{k:06d}"``.
    """
    rng = _as_rng(rng)
    items = []
    for k in range(n):
        kind = rng.choice(TEXT_QUESTION_TYPES)
        question, answer = _text_item(kind, rng)
        items.append(QAItem(f"{prefix}-{k:06d}", kind, question, answer))
    return items


def _check_answer_style(answer_style: str) -> None:
    if answer_style not in ANSWER_STYLES:
        raise ValueError(f"answer_style must be one of {ANSWER_STYLES}, got {answer_style!r}")


DIALOGUE_TURNS: tuple[int, ...] = (2, 3)
"""How many questions a training dialogue of :func:`write_dialogue_set` asks (drawn uniformly)."""


def scene_dialogue(scene: Scene, rng: random.Random | int | str, *, image: str | None = None,
                   answer_style: str = "chained", turns: Sequence[int] = DIALOGUE_TURNS) -> list[QAItem]:
    """The questions of one conversation about ``scene``: a number of turns drawn from ``turns``, then that many of
    the scene's questions (:func:`scene_questions`, captions and multiple choice included) in a random order, with
    the answers in ``answer_style`` (:func:`restyled`) and the multiple-choice ones in :func:`choice_answer`'s form,
    as :func:`write_focus_set` writes them. Every question draws from ``rng``, so the dialogue is a function of it."""
    _check_answer_style(answer_style)
    rng = _as_rng(rng)
    items = _named_choices(restyled(scene, scene_questions(scene, rng, image=image), answer_style))
    return rng.sample(items, min(rng.choice(tuple(turns)), len(items)))


def _named_choices(items: Iterable[QAItem]) -> list[QAItem]:
    """``items`` with each multiple-choice answer as :func:`choice_answer` writes it (``"diamond B"``)."""
    return [dataclasses.replace(item, answer=choice_answer(item.choices, item.answer))
            if item.type == "multiple_choice" and item.choices else item for item in items]


def restyled(scene: Scene, items: list[QAItem], answer_style: str) -> list[QAItem]:
    """``items`` with the answers that ``answer_style`` rewrites rewritten (see :func:`write_training_set`)."""
    def rewritten(item: QAItem) -> str | None:
        if answer_style == "counted" and item.type == "existence":
            return counted_existence_answer(scene, item.question)
        if answer_style == "chained" and item.type in ("existence", "count"):
            return None if item.question.startswith(_TOTAL_COUNT) else chained_answer(scene, item.question)
        if answer_style == "chained" and item.type == "position":
            return chained_position_answer(scene, item.question, item.answer)
        if item.type not in LISTED_TYPES or item.question.startswith(_TOTAL_COUNT):
            return None
        if answer_style in ("restated", "chained"):
            return restated_answer(item.question, item.answer)
        if answer_style in ("listed", "marked"):
            return listed_answer(scene, item.question, marked=answer_style == "marked")
        return None

    return [dataclasses.replace(i, answer=a) if (a := rewritten(i)) is not None else i for i in items]


# ---------------------------------------------------------------------------------------------------------- scoring
_NUMBER_UNITS = {w: n for n, w in enumerate((
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"))}
_NUMBER_TENS = {w: 10 * n for n, w in enumerate(
    ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"), 2)}
_SYNONYMS = {"gray": "grey", "big": "large", "little": "small", "violet": "purple", "rhombus": "diamond",
             "plus": "cross", "color": "colour"}
_SINGULAR = {plural: shape for shape, plural in PLURALS.items()}
_BACKGROUND_WORDS = {w for name in BACKGROUNDS for w in name.split()}


def _tokens(text: str) -> list[str]:
    """Lowercase word and digit tokens, punctuation dropped, spelling variants and plurals of shapes unified."""
    tokens = re.findall(r"[a-z]+|\d+", text.lower())
    tokens = [_SYNONYMS.get(t, t) for t in tokens]
    return [_SINGULAR.get(t, t) for t in tokens]


def _first_number(text: str) -> int | None:
    """The first number in ``text``, digits or words (``"twenty one"``, ``"a hundred"`` is not handled)."""
    tokens = re.findall(r"[a-z]+|\d+", text.lower())
    for i, token in enumerate(tokens):
        if token == "none":
            return 0
        if token.isdigit():
            return int(token)
        if token in _NUMBER_UNITS or token in _NUMBER_TENS:
            value = 0
            for word in tokens[i:]:
                if word in _NUMBER_TENS and value % 100 == 0:
                    value += _NUMBER_TENS[word]
                elif word in _NUMBER_UNITS and value % 10 == 0:
                    value += _NUMBER_UNITS[word]
                elif word == "hundred" and 0 < value < 10:
                    value *= 100
                elif word != "and":
                    break
            return value
    return None


def _answer_number(text: str) -> int | None:
    """The number an answer gives: the digits it ends with (``"circles red blue 2"``, ``"3 + 4 = 7"``), else its
    first number, digits or words (``"There are two circles."``)."""
    match = re.search(r"(\d+)\W*$", text)
    return int(match.group(1)) if match else _first_number(text)


def _vocabulary_answer(prediction: str, vocabulary: Iterable[str]) -> set[str]:
    """The distinct vocabulary words the prediction uses."""
    words = set(vocabulary)
    return {t for t in _tokens(prediction) if t in words}


def _mc_letter(prediction: str, choices: Sequence[str] | None) -> str | None:
    """The option letter of a multiple-choice prediction: ``"B"``, ``"B."``, ``"(B)"``, ``"B) square"``,
    ``"The answer is B"``; else, with ``choices``, the letter of the one option text the prediction names."""
    text = prediction.strip()
    match = re.match(r"^[(\[]?([A-Da-d])(?:[)\].:,]|$)", text)
    if match and (match.group(1).isupper() or len(re.sub(r"[^A-Za-z]", "", text)) == 1 or text[1:2] in ").]"):
        return match.group(1).upper()
    match = re.search(r"\b(?:answer|option)\s*(?:is\s*)?:?\s*[(\[]?([A-D])\b", text, flags=re.IGNORECASE)
    if match:
        return match.group(1).upper()
    if choices:
        named = _vocabulary_answer(prediction, [_tokens(c)[0] for c in choices if _tokens(c)])
        if len(named) == 1:
            word = named.pop()
            for letter, choice in zip(MC_LETTERS, choices, strict=False):
                if _tokens(choice)[:1] == [word]:
                    return letter
    return None


def _caption_content(text: str) -> tuple[Counter[tuple[str | None, str | None, str]], tuple[str, ...]]:
    """Multiset of ``(size, colour, shape)`` mentioned, and the background words before "background"."""
    objects: Counter[tuple[str | None, str | None, str]] = Counter()
    size = colour = None
    tokens = _tokens(text)
    for token in tokens:
        if token in SIZE_EXTENT:
            size = token
        elif token in COLOURS:
            colour = token
        elif token in SHAPES:
            objects[(size, colour, token)] += 1
            size = colour = None
    background: list[str] = []
    if "background" in tokens:
        for token in reversed(tokens[: tokens.index("background")]):
            if token not in _BACKGROUND_WORDS:
                break
            background.insert(0, token)
    return objects, tuple(background)


def score_answer(item_type: str, prediction: str, answer: str, *, choices: Sequence[str] | None = None) -> bool:
    """Whether a model's free-form ``prediction`` gives the canonical ``answer`` of an item of ``item_type``.

    A reasoned answer to a question that names an object (existence, colour, shape, count; the training form of
    :func:`listed_answer`) is read from what follows its last ", so ". Text is lowercased and stripped of
    punctuation first. Yes/no, side, colour and shape answers: the prediction
    must use the answer word and no other word of the same kind ("Yes." and "It is red" pass, "red or blue" fails).
    Counts and arithmetic: the digits the answer ends with, else its first number, digits or words ("three" -> 3).
    Multiple choice: the option letter ("B", "B.", "(B)", "B) square", "The answer is B"), or the text of exactly
    one option when ``choices`` is given.
    Captions: the same multiset of (size, colour, shape) objects, in any order, and the same background. Spelling:
    the letters, one per token. Alphabetical: the same words in the same order. Other types: exact match of the
    normalised text.
    """
    if item_type == "multiple_choice":
        return _mc_letter(prediction, choices) == answer.strip().upper()
    if item_type in LISTED_TYPES:
        prediction = prediction.rpartition(_SO)[2]
    if item_type in ("count", "arithmetic", "letter_count"):
        number = _answer_number(prediction)
        return number is not None and str(number) == answer.strip()
    if item_type == "caption":
        expected_objects, expected_background = _caption_content(answer)
        objects, background = _caption_content(prediction)
        return objects == expected_objects and (not expected_background or background == expected_background)
    if item_type == "spelling":
        letters = re.findall(r"[a-z]+", prediction.lower())
        return bool(letters) and all(len(t) == 1 for t in letters) and "".join(letters) == answer.replace(" ", "")
    if item_type == "alphabetical":
        return re.findall(r"[a-z]+", prediction.lower()) == re.findall(r"[a-z]+", answer.lower())
    expected = " ".join(_tokens(answer))
    for vocabulary in (("yes", "no"), SIDES, tuple(COLOURS), SHAPES):
        if expected in vocabulary and item_type in ("existence", "position", "colour", "shape"):
            return _vocabulary_answer(prediction, vocabulary) == {expected}
    return " ".join(_tokens(prediction)) == expected


def accuracy_by_type(items: Iterable[QAItem], predictions: Mapping[str, str]) -> dict[str, tuple[int, int]]:
    """``{type: (correct, total)}`` plus ``"overall"``; an item without a prediction counts as wrong."""
    totals: dict[str, list[int]] = {}
    for item in items:
        correct = item.id in predictions and score_answer(item.type, predictions[item.id], item.answer,
                                                          choices=item.choices)
        for key in (item.type, "overall"):
            entry = totals.setdefault(key, [0, 0])
            entry[0] += int(correct)
            entry[1] += 1
    return {key: (c, n) for key, (c, n) in totals.items()}
