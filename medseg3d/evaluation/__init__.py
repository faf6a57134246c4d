"""Scores and what is drawn from them: Dice, HD95, NSD, statistics, volumes, figures."""
