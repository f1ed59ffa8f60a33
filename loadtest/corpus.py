"""A bank of plain English paragraphs that prompts are cut from: real-looking text keeps the tokenizer's
tokens-per-word ratio and the model's attention patterns close to what users send, unlike random token ids."""
from __future__ import annotations

import re

PARAGRAPHS = (
    "The city library opened its new reading room on a grey Monday morning. Volunteers had spent the weekend "
    "moving shelves, labelling boxes and arguing about where the atlases should go. By nine o'clock a short queue "
    "had formed outside the glass doors, mostly students with laptops and retired teachers with newspapers. The "
    "head librarian gave a brief speech about quiet study and free access to knowledge. Then she cut a red ribbon "
    "with a pair of scissors borrowed from the children's section.",

    "Baking bread at home takes patience more than skill. Flour, water, salt and yeast are mixed into a rough dough "
    "and left to rest for half an hour. Folding the dough every so often builds the gluten that gives the loaf its "
    "structure. A long, cool rise overnight in the refrigerator develops a deeper flavour. In the morning the dough "
    "is shaped, proofed once more and baked in a very hot oven until the crust crackles as it cools.",

    "Tomorrow will begin cloudy with patchy fog along the coast, clearing by late morning. Winds from the west will "
    "strengthen during the afternoon, reaching thirty kilometres an hour on exposed hills. Temperatures will climb "
    "to eighteen degrees inland but stay several degrees cooler near the sea. A band of light rain is expected to "
    "cross the region after sunset. Drivers should allow extra time on mountain roads, where visibility may drop "
    "quickly.",

    "Version two of the scheduling service changes how jobs are retried after a failure. Previously a failed job "
    "was retried immediately, which could overload a database that was already struggling. The new release waits "
    "for an exponentially growing delay with a small random jitter between attempts. Operators can set the maximum "
    "number of retries per job type in the configuration file. Metrics now report the number of retries and the "
    "time spent waiting, so that dashboards show when a dependency is unhealthy.",

    "Tomatoes grow best in a sunny spot with rich, well-drained soil. Seedlings should be planted deeply, since new "
    "roots form along the buried part of the stem. Water them at the base in the early morning rather than "
    "spraying the leaves, which invites disease. A stake or cage keeps the heavy stems off the ground as the fruit "
    "ripens. Pinching out the small shoots that appear between the stem and the branches directs energy into "
    "fewer, larger tomatoes.",

    "The museum's new exhibition traces the history of navigation from the stars to satellites. Visitors start in "
    "a dark room where the night sky is projected on a curved ceiling. Later galleries show brass sextants, "
    "hand-drawn charts and a marine chronometer that once crossed the Atlantic. An interactive table lets children "
    "plot a course between two harbours using only a compass and a ruler. The final room explains how a phone "
    "finds its position by timing signals from satellites high above the earth.",

    "Good meetings have a clear purpose, a short agenda and the right people in the room. Sending the agenda a day "
    "in advance lets participants prepare questions and data. Someone should keep track of decisions and who owns "
    "each follow-up task. Ending five minutes early gives everyone time to reach their next appointment. If a "
    "meeting regularly ends without a decision, it may be better replaced by a written update.",

    "The river rises in the hills to the north and flows for three hundred kilometres before reaching the sea. "
    "Along its upper course it cuts through narrow valleys lined with oak and beech. Farther down it widens and "
    "slows, passing market towns, old mills and flat fields of wheat. Herons wait motionless in the shallows while "
    "swallows skim the surface for insects. Near the estuary the water turns brackish, and wading birds gather on "
    "the mud at low tide.",

    "Learning a new language is easier with a little practice every day than with long sessions once a week. "
    "Reading simple stories builds vocabulary in context, which is easier to remember than lists of words. "
    "Speaking aloud, even alone, trains the mouth to form unfamiliar sounds. Mistakes are a normal part of the "
    "process and often the fastest way to learn a rule. After a few months many learners find they can follow "
    "the main points of a slow conversation.",

    "The committee reviewed the budget for the coming year in a long session on Thursday. Spending on road repairs "
    "will rise by twelve percent, funded partly by savings in office rent. Two new buses will be bought for the "
    "routes that serve the hospital and the university. Members disagreed about the cost of extending the "
    "swimming pool's opening hours. A final vote on the full budget is planned for the first week of next month.",
)


def sentences() -> list[str]:
    """Every sentence of the bank, in order."""
    return [s for p in PARAGRAPHS for s in re.split(r"(?<=[.!?])\s+", p) if s]
