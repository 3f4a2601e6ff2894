#!/usr/bin/perl -w                                         # -*- perl -*-
use strict;
# A comment after the switches of the #! line (Template-Toolkit's t/*.t):
# perl reads -w and stops at the "#"; so must the choice of forked or cold
use Test::More tests => 1;
ok $^W, '-w from the #! line is on';
