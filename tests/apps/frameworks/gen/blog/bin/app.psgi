#!/usr/bin/env perl
# bin/app.psgi as `dancer2 gen -a Blog` writes it: lib/ found with FindBin.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/../lib";

use Blog;

Blog->to_app;
